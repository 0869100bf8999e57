#!/usr/bin/env bash
# Build the peers' virtual environments from PyPI, one per peer, under benchmarks/peers/.venvs/<peer>.
#
# Usage: bash benchmarks/peers/setup_envs.sh [gears] [state] [cellflow]   (default: all three)
#
# Peers are never dependencies of vcell. scGen runs in vcell's own environment through pertpy
# (Python 3.11: pip install "pertpy==1.0.3" "statsmodels<0.15"; Python >= 3.12: pip install "pertpy[jax]>=1.4",
# whose Scgen is its own JAX model), so it has no venv here.
# CPA (cpa-tools) is not built: it requires torch < 2 and scvi-tools < 1, which cannot be installed
# next to a current torch/Python 3.11 stack.
#
# torch is installed FIRST and pinned (torch==2.13.0): with the local CPU wheel on the find-links path
# this picks the CPU build; an unpinned torch would pull several GB of CUDA libraries.
# Environment variables: PYTHON (interpreter for the venvs, default python3.11), TORCH_SPEC.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$HERE/.venvs"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
mkdir -p "$VENVS"

make_venv() {  # name
    local name="$1" dir="$VENVS/$1"
    if [[ -f "$dir/.ok" ]]; then
        echo "[$name] already built ($dir); delete it to rebuild"
        return 1
    fi
    # a half-built venv (an earlier run that failed) is reused: pip skips what is already installed
    [[ -x "$dir/bin/python" ]] || "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --upgrade pip wheel
    "$dir/bin/python" -m pip install --quiet "$TORCH_SPEC"
}

build_gears() {
    make_venv gears || return 0
    local py="$VENVS/gears/bin/python"
    "$py" -m pip install --quiet "cell-gears==0.1.2" "torch-geometric==2.8.1" "anndata" "scanpy" "scipy" "h5py"
    "$py" -c "import gears, torch_geometric, torch; print('gears ok, torch', torch.__version__, 'pyg', torch_geometric.__version__)"
    touch "$VENVS/gears/.ok"
}

build_state() {
    make_venv state || return 0
    local py="$VENVS/state/bin/python"
    "$py" -m pip install --quiet "arc-state==0.11.1" "$TORCH_SPEC"
    "$VENVS/state/bin/state" --help > /dev/null
    "$py" -c "import torch, anndata; print('state ok, torch', torch.__version__)"
    touch "$VENVS/state/.ok"
}

build_cellflow() {
    make_venv cellflow || return 0
    local py="$VENVS/cellflow/bin/python"
    "$py" -m pip install --quiet "cellflow-tools==0.0.9" "jax[cpu]" "requests"  # cellflow imports requests without declaring it
    "$py" -c "import cellflow, jax; print('cellflow ok, jax', jax.__version__, jax.devices())"
    touch "$VENVS/cellflow/.ok"
}

peers=("$@")
[[ ${#peers[@]} -eq 0 ]] && peers=(gears state cellflow)
for peer in "${peers[@]}"; do
    case "$peer" in
        gears) build_gears ;;
        state) build_state ;;
        cellflow) build_cellflow ;;
        *) echo "unknown peer '$peer' (expected gears, state or cellflow)" >&2; exit 2 ;;
    esac
done
echo "done: ${peers[*]}"
