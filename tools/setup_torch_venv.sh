#!/usr/bin/env bash
# Creates the PyTorch venv used only by the comparison benchmarks (never by tests or CI).
# It lives outside the repository because the torch wheel and its CUDA dependencies are several GB.
# Location: $MMFORMER_TORCH_VENV, default $HOME/.cache/mmformer/torch-venv.
set -euo pipefail

VENV="${MMFORMER_TORCH_VENV:-$HOME/.cache/mmformer/torch-venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi

"$VENV/bin/python" -m pip install --upgrade pip
# scipy: the official matcher's linear_sum_assignment, for the POS training benchmark (tools/pos_torch.py)
"$VENV/bin/python" -m pip install torch numpy scipy

"$VENV/bin/python" -c 'import torch, numpy, scipy; print("torch", torch.__version__, "numpy", numpy.__version__, "scipy", scipy.__version__, "threads", torch.get_num_threads())'
echo "venv ready: $VENV"
