#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine. Idempotent: it
# installs only packages that are missing, and does nothing when all are there.
set -euo pipefail

# gdb: the SMP saves a hung worker's thread backtraces with it (RUN_DIR/stacks).
packages=(libisal-dev libzmq3-dev libibverbs-dev libopenblas-dev pkg-config gdb)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if ((${#missing[@]} > 0)); then
    echo "setup: installing ${missing[*]}"
    sudo=""
    if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

if ! command -v swift >/dev/null; then
    echo "setup: swift is not on PATH; install Swift 6.0 or later (swift.org) first" >&2
    exit 1
fi
