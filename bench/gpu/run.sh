#!/usr/bin/env bash
# The GPU latency check of sdxl-bench, as one call on a lent H100/H200 (no network) or any CUDA runner.
#
#   bash bench/gpu/run.sh                      # sdxl-random (full SDXL 1.0 architecture, random weights)
#   bash bench/gpu/run.sh --base DIR --refiner DIR [--vae DIR]   # real weights from local folders
#   bash bench/gpu/run.sh --cases eager,fp8 --profile fp8       # + a device timeline of fp8 (sdxl_core/timeline.py)
#
# Wheels for packages the machine lacks (diffusers, compel, open-clip-torch, ...) are installed from .whl/
# when that folder is present (bash bench/gpu/wheels.sh fills it, where pip can reach the package index). Results: $OUT/speed.json (or reports/gpu/speed.json), table printed last.
# torch.compile's artifacts are saved to $OUT/compile-cache/ after each compiled case, and loaded at the start from
# ${SDXL_BENCH_COMPILE_CACHE_IN:-.compile-cache}/ when an earlier run's are there (same GPU model, torch, triton).
set -euo pipefail
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out="${OUT:-reports/gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv || true
base_args=(--base sdxl-random)
case " $* " in *" --base "*) base_args=() ;; esac
cache_args=(--compile-cache-out "$out/compile-cache")
cache_in="${SDXL_BENCH_COMPILE_CACHE_IN:-.compile-cache}"
if [ -f "$cache_in/compile-cache.json" ]; then cache_args+=(--compile-cache-in "$cache_in"); fi
python3 -m sdxl_core.cli speed "${base_args[@]}" --budget-s "${SDXL_BENCH_BUDGET_S:-400}" --out "$out/speed.json" \
  "${cache_args[@]}" "$@"
