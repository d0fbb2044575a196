#!/usr/bin/env bash
# Builds `pdctl-sim:dev`, a FROM-scratch image holding this checkout's pdctl as /usr/bin/pdctl
# and /usr/bin/vllm (invoked as `vllm`, pdctl is the simulator), so a Docker plan runs
# unchanged with no registry and no GPU. The binary is the dynamically linked one cargo builds
# anyway (no musl target here), shipped with exactly the libraries `ldd` lists.
#   scripts/build-sim-image.sh [--release] [TAG]
set -euo pipefail
cd "$(dirname "$0")/.."

profile=debug
cargo_flags=()
if [ "${1:-}" = "--release" ]; then
    profile=release
    cargo_flags+=(--release)
    shift
fi
tag="${1:-pdctl-sim:dev}"

cargo build --bin pdctl "${cargo_flags[@]}"
bin="target/$profile/pdctl"

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/root/usr/bin" "$ctx/root/tmp"
if command -v strip >/dev/null 2>&1; then
    strip -o "$ctx/root/usr/bin/pdctl" "$bin"
else
    cp "$bin" "$ctx/root/usr/bin/pdctl"
fi
ln -s pdctl "$ctx/root/usr/bin/vllm"
# The loader and every shared library, at the paths the binary looks for them.
for lib in $(ldd "$bin" | grep -oE '/[^ ]+'); do
    cp --parents -L "$lib" "$ctx/root/"
done
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY root/ /
ENTRYPOINT ["/usr/bin/vllm"]
CMD ["serve", "sim-model", "--host", "127.0.0.1", "--port", "8000"]
DOCKERFILE
docker build --quiet -t "$tag" "$ctx" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
