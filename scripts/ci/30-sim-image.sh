#!/usr/bin/env bash
# The Docker tests (tests/docker_*.rs) run the simulator image; build it when an engine answers.
# Without one the tests themselves fail under CI=true, with a clear message.
set -euo pipefail
cd "$(dirname "$0")/../.."
if docker info >/dev/null 2>&1; then
    scripts/build-sim-image.sh
else
    echo "no Docker Engine answers; skipping the simulator image (tests/docker_*.rs will say so)"
fi
