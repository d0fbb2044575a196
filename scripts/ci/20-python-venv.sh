#!/usr/bin/env bash
# A Python venv at .venv with the real OpenAI client, for the proxy's client-library test.
# Idempotent: only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import openai' 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check 'openai>=1.40'
fi
