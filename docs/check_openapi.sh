#!/usr/bin/env bash
# Validates docs/openapi.yaml (OpenAPI 3.1) and checks a real node's replies against it
# (check_openapi.py), and runs docs/production.md's snippets (check_snippets.py). Needs a built target/debug/herald (or HERALD_BIN); PyPI packages go
# into a venv under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/openapi-venv
if ! "$venv/bin/python" -c 'import openapi_spec_validator, yaml, websockets' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q openapi-spec-validator==0.9.0 PyYAML==6.0.3 websockets==17.4
fi
"$venv/bin/python" docs/check_openapi.py
# docs/production.md's token snippets, run and checked against a node.
"$venv/bin/python" docs/check_snippets.py
