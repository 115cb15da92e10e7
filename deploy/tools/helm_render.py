#!/usr/bin/env python3
"""Render or lint a Helm chart with Helm's own Go engine, without a helm binary.

Uses the PyPI package helm-python-sdk (pinned in requirements.txt), a ctypes
binding to libhelm_c: Helm's official Go SDK (v4) compiled as a C library.
Rendering is Helm's engine (text/template + sprig + Helm's functions), not an
imitation.

  helm_render.py render CHART VALUES.json RELEASE NAMESPACE   -> JSON {template: manifest}
  helm_render.py lint   CHART VALUES.json                     -> JSON lint report
"""
import json
import sys

import helm_python as helm


def main() -> int:
    cmd, chart_dir, values_file = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(values_file) as f:
        values = json.load(f)
    if cmd == "render":
        release, namespace = sys.argv[4], sys.argv[5]
        with helm.Chart.load(chart_dir) as chart:
            chart.validate_schema(values)
            out = chart.render(values, name=release, namespace=namespace, is_install=True)
        json.dump({"sdk": helm.helm_sdk_version(), "manifests": out}, sys.stdout)
    elif cmd == "lint":
        report = helm.lint(chart_dir, values, strict=True, kube_version="v1.33.0")
        json.dump({"sdk": helm.helm_sdk_version(), "report": report}, sys.stdout)
    else:
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
