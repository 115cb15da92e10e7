{{/* Chart name (the app.kubernetes.io/name label; also the Prometheus job). */}}
{{- define "detector.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "detector.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "detector.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "detector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "detector.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{- define "detector.labels" -}}
{{ include "detector.selectorLabels" . }}
app.kubernetes.io/part-of: detector
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "detector.chart" . }}
{{- end -}}

{{- define "detector.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "detector.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "detector.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The host's cgroup-v2 root as seen inside the container. */}}
{{- define "detector.cgroupMount" -}}
{{- printf "/host%s" .Values.cgroup.hostPath -}}
{{- end -}}
{{- define "detector.cgroupRoot" -}}
{{- if .Values.cgroup.v2Subdir -}}
{{- printf "%s/%s" (include "detector.cgroupMount" .) .Values.cgroup.v2Subdir -}}
{{- else -}}
{{- include "detector.cgroupMount" . -}}
{{- end -}}
{{- end -}}

{{/* config.yaml of `detector run --config` (snake_case keys, detector/src/cli.rs). */}}
{{- define "detector.config" -}}
{{- if not (has .Values.mode (list "observe" "enforce")) -}}
{{- fail (printf "mode must be observe or enforce, not %q" .Values.mode) -}}
{{- end -}}
{{- $c := dict
    "policy" (list "/etc/detector/intents")
    "kubelet_dir" .Values.kubeletDir
    "cgroup_root" (include "detector.cgroupRoot" .)
    "metrics_addr" (printf "0.0.0.0:%d" (int .Values.metrics.port))
    "mode" .Values.mode
    "log_format" .Values.logFormat
    "learn_window" .Values.config.learnWindow
    "aggregate_window" .Values.config.aggregateWindow
    "connect_dedup_ms" (int .Values.config.connectDedupMs) -}}
{{- if .Values.bpffs.enabled }}{{ $_ := set $c "pin_dir" (printf "%s/%s" .Values.bpffs.mountPath (include "detector.fullname" .)) }}{{ end -}}
{{- with .Values.config.credentialFiles }}{{ $_ := set $c "credential_file" . }}{{ end -}}
{{- with .Values.config.trustedHostReaders }}{{ $_ := set $c "trusted_host_reader" . }}{{ end -}}
{{- with .Values.config.denyCgroups }}{{ $_ := set $c "deny_cgroup" . }}{{ end -}}
{{- /* No RBAC and no token mounted: do not even try the API. */ -}}
{{- if not .Values.kubernetesApi.enabled }}{{ $_ := set $c "kube_api" "off" }}{{ end -}}
{{- $sinks := dict -}}
{{- range $k, $v := .Values.sinks -}}
{{- if not (kindIs "invalid" $v) }}{{ $_ := set $sinks $k $v }}{{ end -}}
{{- end -}}
{{- /* A missing jsonl key means stdout to the daemon; a nulled one means off. */ -}}
{{- if not (hasKey $sinks "jsonl") }}{{ $_ := set $sinks "jsonl" nil }}{{ end -}}
{{- $_ := set $c "sinks" $sinks -}}
{{- $c = mergeOverwrite $c (deepCopy .Values.extraConfig) -}}
{{- toYaml $c -}}
{{- end -}}

{{- define "detector.selfIntent" -}}
apiVersion: detector.dev/v1alpha1
kind: WorkloadIntent
metadata:
  name: {{ include "detector.fullname" . }}
  namespace: {{ .Release.Namespace }}
spec:
  selector:
    namespace: {{ .Release.Namespace }}
    serviceAccount: {{ include "detector.serviceAccountName" . }}
  readers: [/usr/local/bin/detector]
  destinations:
    - {host: kubernetes.default.svc.cluster.local, ports: [443]}
    - {cidr: {{ .Values.selfIntent.serviceCIDR }}, ports: [53]}
  action: {{ .Values.selfIntent.action }}
{{- end -}}
