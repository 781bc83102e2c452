#!/usr/bin/env bash
# Shared by cluster/launch, cluster/stop and chaos/run: installs what is
# missing and builds the release binaries (incremental; quiet unless it fails).
# FT_BIN=DIR uses binaries already built there instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${FT_BIN:-}" ]]; then
    echo "$FT_BIN"
    exit 0
fi
"$root/scripts/setup.sh" >&2
log=$(mktemp)
if ! (cd "$root" && swift build -c release >"$log" 2>&1); then
    grep -v '^\[' "$log" >&2 || true
    rm -f "$log"
    echo "build failed" >&2
    exit 1
fi
rm -f "$log"
echo "$root/.build/release"
