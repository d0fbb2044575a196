#!/usr/bin/env bash
# Offline validators for the export tests, in the project venv (.venv): kubernetes-validate for
# built-in kinds, and PyYAML + jsonschema for scripts/validate-crd.py (KServe's CRDs).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check kubernetes-validate jsonschema pyyaml
fi
