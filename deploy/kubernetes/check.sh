#!/usr/bin/env bash
# Renders and validates deploy/kubernetes, then runs the real binary as the rendered
# Deployment would (check.py says what exactly). Needs kubectl (its built-in kustomize),
# promtool, redis-server, ip (root, for the pod's network namespace), and a built
# target/debug/herald (or HERALD_BIN). PyPI packages go into a venv under target/.
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v kubectl >/dev/null 2>&1 || {
  echo "deploy/kubernetes: kubectl is missing; install it (https://kubernetes.io/docs/tasks/tools/), e.g. apt-get install kubectl from the Kubernetes apt repository"
  exit 1
}
command -v promtool >/dev/null 2>&1 || { echo "deploy/kubernetes: promtool is missing: apt-get install prometheus"; exit 1; }

venv=target/k8s-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate==1.37.0 PyYAML==6.0.3 websockets==17.4
fi
PATH="$PWD/$venv/bin:$PATH" "$venv/bin/python" deploy/kubernetes/check.py
