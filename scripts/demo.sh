#!/usr/bin/env bash
# The README's main command: from a fresh clone, installs what is missing,
# builds (release), and runs the demo job (4 nodes x 2 workers, EC 3+1, a node
# killed midway and recovered from memory), ending with a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "demo: building (release)"
swift build -c release 2>&1 | { grep -v '^\[' || true; }
[[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "demo: build failed" >&2; exit 1; }
exec .build/release/ft-launch demo "$@"
