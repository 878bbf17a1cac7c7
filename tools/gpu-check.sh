#!/usr/bin/env bash
# The GPU check of issue 12 in one command, on a machine with an NVIDIA GPU (driver >= 580):
#
#   tools/gpu-check.sh [extra gpu-check options]
#
# Uses, in this order: $MMFORMER_GPU_BIN, a prebuilt .gpu/xtask (carried from a build machine),
# or builds target/cuda/target/release/xtask with tools/setup-cuda.sh. CUDA 13 libraries
# (cuBLAS, cuRAND, NVRTC, cudart) come from target/cuda or from the machine (PyTorch's nvidia
# wheels, /usr/local/cuda); the PyTorch comparison uses the python3 that imports torch.
# Output: the summary last, and summary.json in the work folder ($MMFORMER_GPU_WORK, default
# runs/gpu-check; it also holds the synthetic data, runs and shards, a few GB).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${MMFORMER_GPU_WORK:-$root/runs/gpu-check}"
mkdir -p "$out"

cuda_dir="${MMFORMER_CUDA_DIR:-$root/target/cuda}"
bin="${MMFORMER_GPU_BIN:-}"
if [[ -z "$bin" && -x "$root/.gpu/xtask" ]]; then bin="$root/.gpu/xtask"; fi
if [[ -z "$bin" ]]; then
  bash "$root/tools/setup-cuda.sh" || exit 1
  bin="$cuda_dir/target/release/xtask"
fi

fixtures="${MMFORMER_PARITY_DIR:-}"
for d in "$root/.gpu/fixtures" "$root/../shared/fixtures/parity"; do
  [[ -z "$fixtures" && -f "$d/forward.safetensors" ]] && fixtures="$d"
done

# Each CUDA library from the first folder that has it.
python="$(command -v python3 || true)"
site=""
[[ -n "$python" ]] && site="$("$python" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)"
dirs=()
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
  found=""
  for d in "$cuda_dir/pkgs/nvidia/cu13/lib" $(for s in $site; do echo "$s"/nvidia/cu13/lib "$s"/nvidia/*/lib; done) \
           /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    if [[ -e "$d/$lib" ]]; then found="$d"; break; fi
  done
  if [[ -z "$found" ]]; then
    found="$(dirname "$(find /usr /opt -name "$lib" 2>/dev/null | head -1)" 2>/dev/null || true)"
  fi
  [[ -n "$found" && "$found" != "." ]] && dirs+=("$found") || echo "gpu-check: $lib not found" >&2
done
ld=""
if [[ ${#dirs[@]} -gt 0 ]]; then ld="$(printf '%s\n' "${dirs[@]}" | awk '!seen[$0]++' | paste -sd:)"; fi
if [[ -n "$ld" ]]; then export LD_LIBRARY_PATH="$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
export MMFORMER_ROOT="$root"
if [[ -z "${MMFORMER_TORCH_VENV:-}" && -n "$python" ]] && "$python" -c 'import torch' 2>/dev/null; then
  # TorchServer runs <venv>/bin/python: a wrapper around the python3 that has torch.
  mkdir -p "$out/torch-venv/bin"
  printf '#!/bin/sh\nexec %q "$@"\n' "$python" >"$out/torch-venv/bin/python"
  chmod +x "$out/torch-venv/bin/python"
  export MMFORMER_TORCH_VENV="$out/torch-venv"
fi

echo "gpu-check: $bin"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "gpu-check: nvidia-smi not available"
missing="$(ldd "$bin" 2>/dev/null | grep 'not found' || true)"
[[ -n "$missing" ]] && echo "gpu-check: unresolved libraries:" && echo "$missing"
exec "$bin" gpu-check --device "${MMFORMER_GPU_DEVICE:-cuda:0}" ${fixtures:+--fixtures "$fixtures"} --out "$out" "$@"
