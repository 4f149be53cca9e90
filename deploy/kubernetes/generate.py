#!/usr/bin/env python3
"""Writes components/monitoring/prometheusrule.yaml from deploy/alerts.yml, so the
Kubernetes alerts are the ones docker-compose's Prometheus loads. CI runs this and fails
when the committed file differs (check.py)."""
import pathlib
import sys

import yaml

here = pathlib.Path(__file__).resolve().parent
alerts = yaml.safe_load((here.parent / "alerts.yml").read_text())
rule = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PrometheusRule",
    "metadata": {"name": "herald"},
    "spec": {"groups": alerts["groups"]},
}
text = (
    "# Generated from deploy/alerts.yml by deploy/kubernetes/generate.py: edit those.\n"
    + yaml.safe_dump(rule, sort_keys=False, width=1000, allow_unicode=True)
)
out = here / "components" / "monitoring" / "prometheusrule.yaml"
if "--check" in sys.argv:
    if out.read_text() != text:
        sys.exit(f"{out} is stale: run python3 deploy/kubernetes/generate.py and commit it")
else:
    out.write_text(text)
