#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine. Idempotent: it
# installs only packages that are missing, and does nothing when all are there.
set -euo pipefail

# gdb: the SMP saves a hung worker's thread backtraces with it (RUN_DIR/stacks).
# librsvg2-bin: rsvg-convert, for `ftctl timeline --png` (the SVG needs nothing).
packages=(libisal-dev libzmq3-dev libibverbs-dev libopenblas-dev pkg-config gdb librsvg2-bin)
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

# prometheus (with promtool): the tests scrape a running job with a real Prometheus and
# lint /metrics with promtool; curl reads /metrics. Without the web UI's recommends.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v curl >/dev/null; then
    echo "setup: installing prometheus curl"
    sudo=""
    if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus curl
fi

# Slurm (slurmctld, slurmd, the client commands) and munge: the Slurm tests start a real
# cluster of their own (cluster/slurm/, Tests/FTControlTests/SlurmTests.swift). Nothing is
# started or enabled here.
if ! command -v slurmctld >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    echo "setup: installing slurm-wlm munge"
    sudo=""
    if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends slurm-wlm munge
fi

if ! command -v swift >/dev/null; then
    echo "setup: swift is not on PATH; install Swift 6.0 or later (swift.org) first" >&2
    exit 1
fi

# PyTorch and the ft_torch package (python/), for workers written in Python.
# torch: whatever build is installed already (a GPU machine's own); otherwise
# the CPU build (pip finds torch==2.13.0+cpu in its configured find-links).
python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null; then
    echo "setup: $python is not on PATH; install Python 3.9 or later first" >&2
    exit 1
fi
pip_install() { "$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# One look (no import): the modules missing, and where ft_torch is installed from.
read -r -a missing_py <<<"$("$python" -c "
import importlib.util as u
print(' '.join(m for m in ('torch', 'numpy', 'pytest', 'safetensors') if u.find_spec(m) is None))")"
for m in "${missing_py[@]}"; do
    spec=$m
    [[ $m == torch ]] && spec=torch==2.13.0+cpu
    echo "setup: installing $spec"
    pip_install "$spec"
done
installed=$("$python" -c "import importlib.util as u; s = u.find_spec('ft_torch'); print(s.submodule_search_locations[0] if s else '')")
if [[ "$installed" != "$root/python/ft_torch" ]]; then
    echo "setup: installing ft_torch from $root/python (editable)"
    pip_install --no-build-isolation -e "$root/python"
fi
