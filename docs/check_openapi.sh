#!/usr/bin/env bash
# Validates docs/openapi.yaml (OpenAPI 3.1) and checks a real node's replies against it
# (check_openapi.py). Needs a built target/debug/herald (or HERALD_BIN); PyPI packages go
# into a venv under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/openapi-venv
if [ ! -x "$venv/bin/openapi-spec-validator" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q openapi-spec-validator==0.9.0 PyYAML==6.0.3
fi
"$venv/bin/python" docs/check_openapi.py
