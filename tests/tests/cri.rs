//! A containerd + CRI pod (../shared/RUNTIME.md): the test acts as kubelet
//! (RunPodSandbox with the `io.kubernetes.pod.*` labels, CreateContainer,
//! StartContainer over `runtime.v1`), and the attributor, with a CRI handle
//! on that containerd's socket, names the container's cgroup: pod name,
//! namespace, labels, container name and image.

use std::time::Duration;

use detector::attribution::{cri::CriHandle, Attributor};
use detector_tests::{
    cgroup2_root,
    containerd::{Containerd, BUSYBOX_IMAGE},
    require_root,
    runc::new_pod_uid,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pod_is_named_from_cri() {
    require_root();
    let mut cd = Containerd::start().expect("containerd");
    let uid = new_pod_uid();
    let sandbox = cd.sandbox_config(
        "web-7d4b9",
        "shop",
        &uid,
        &[("app", "web"), ("tier", "frontend")],
    );
    let ctr = Containerd::container_config(&sandbox, "app", &["/bin/sleep", "300"], vec![]);
    let sb = sandbox.clone();
    let (sandbox_id, container_id) = cd
        .block_on(move |mut c| async move {
            let sid = c.run_pod_sandbox(sb.clone()).await?;
            let cid = c.create_container(&sid, ctr, sb).await?;
            c.start_container(&cid).await?;
            Ok((sid, cid))
        })
        .unwrap_or_else(|e| panic!("CRI pod: {e:#}\n{}", cd.log()));
    eprintln!("sandbox {sandbox_id}, container {container_id}");

    // The container is where the cgroupfs driver puts it.
    let rel = format!("kubepods/besteffort/pod{uid}/{container_id}");
    let dir = cgroup2_root().join(&rel);
    let id = std::fs::metadata(&dir)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or_else(|e| panic!("container cgroup {}: {e}", dir.display()));

    let mut attr =
        Attributor::new(cgroup2_root()).with_cri(CriHandle::spawn(Some(cd.socket.clone())));
    attr.min_rescan = Duration::ZERO;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let w = loop {
        let w = attr.resolve(id).expect("container cgroup resolves");
        if w.pod_name.is_some() && w.container_name.is_some() {
            break w;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no CRI names within 15 s: {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("{w:#?}");
    let pod = w.pod.clone().expect("a pod cgroup");
    assert_eq!(pod.pod_uid, uid);
    assert_eq!(pod.container_id.as_deref(), Some(container_id.as_str()));
    assert_eq!(w.cgroup_path, format!("/{rel}"));
    assert_eq!(w.pod_name.as_deref(), Some("web-7d4b9"));
    assert_eq!(w.namespace.as_deref(), Some("shop"));
    assert_eq!(w.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(w.labels.get("tier").map(String::as_str), Some("frontend"));
    assert_eq!(w.container_name.as_deref(), Some("app"));
    assert_eq!(w.image.as_deref(), Some(BUSYBOX_IMAGE));
    let fw = w.to_workload();
    assert_eq!(fw.pod.as_deref(), Some("web-7d4b9"));
    assert_eq!(fw.namespace.as_deref(), Some("shop"));

    // Kubelet's teardown; the harness's Drop does it too on failure.
    cd.remove_all_pods().expect("stop and remove the pod");
    assert!(!dir.exists(), "container cgroup left behind");
}

/// Through the daemon with `--cri-socket`: a CRI container of another pod
/// reads pod A's token; the finding names the reader's pod and namespace
/// as CRI knows them.
#[test]
fn daemon_names_a_cri_reader_in_its_finding() {
    use detector_tests::{
        runc::{kubelet_atomic_write, TOKEN_PATH},
        Daemon, Tmpfs,
    };
    require_root();
    let kubelet = Tmpfs::new("cri-kubelet");
    let uid_a = new_pod_uid();
    let vol = kubelet
        .dir
        .join("pods")
        .join(&uid_a)
        .join("volumes/kubernetes.io~projected/kube-api-access-q9z2w");
    std::fs::create_dir_all(&vol).unwrap();
    kubelet_atomic_write(
        &vol,
        &[("token", "token-a"), ("ca.crt", "ca"), ("namespace", "a")],
    );

    let mut cd = Containerd::start().expect("containerd");
    let uid_b = new_pod_uid();
    let sandbox = cd.sandbox_config("thief-0", "rogue", &uid_b, &[("app", "thief")]);
    let script = format!("sleep 2; while true; do cat {TOKEN_PATH} >/dev/null; sleep 1; done");
    let ctr = Containerd::container_config(
        &sandbox,
        "reader",
        &["/bin/sh", "-c", &script],
        vec![detector::attribution::cri::v1::Mount {
            container_path: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
            host_path: vol.display().to_string(),
            readonly: true,
        }],
    );
    let kdir = kubelet.dir.display().to_string();
    let sock = cd.socket.display().to_string();
    let d = Daemon::start(&[
        "--kubelet-dir",
        &kdir,
        "--cri-socket",
        &sock,
        "--aggregate-window",
        "2s",
    ])
    .expect("daemon");
    let sb = sandbox.clone();
    let cid = cd
        .block_on(move |mut c| async move {
            let sid = c.run_pod_sandbox(sb.clone()).await?;
            let cid = c.create_container(&sid, ctr, sb).await?;
            c.start_container(&cid).await?;
            Ok(cid)
        })
        .unwrap_or_else(|e| panic!("CRI pod: {e:#}\n{}", cd.log()));
    // The pod is newer than the daemon's CRI snapshot: the first finding may
    // come before the refresh it triggers; the next ones carry the names.
    let f = d.wait_findings(Duration::from_secs(30), |f| {
        f["kind"] == "foreign_credential" && f["workload"]["pod"] == "thief-0"
    });
    let f = &f[0];
    eprintln!("{f:#}");
    let all = d.findings();
    let first = all
        .iter()
        .find(|f| f["workload"]["pod_uid"] == uid_b.as_str())
        .unwrap();
    eprintln!(
        "first finding of the CRI pod named it: {} (pod {}, namespace {})",
        first["workload"]["pod"] == "thief-0",
        first["workload"]["pod"],
        first["workload"]["namespace"]
    );
    assert_eq!(f["workload"]["namespace"], "rogue", "{f}");
    assert_eq!(f["workload"]["pod_uid"], uid_b.as_str(), "{f}");
    assert_eq!(f["workload"]["container_id"], cid.as_str(), "{f}");
    assert_eq!(f["credential"]["owner_pod_uid"], uid_a.as_str(), "{f}");
    assert!(d.log().contains("connected to CRI runtime"), "{}", d.log());
    drop(d);
    cd.remove_all_pods().expect("stop and remove the pod");
}
