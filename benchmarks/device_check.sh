#!/usr/bin/env bash
# One prepared script for a session that is lent an H200, sized for ONE device call of at most 8 minutes
# (limits below sum to 460 s), most important figures first: DiT forward vs diffusers, attention kernel rates,
# VAE decode vs diffusers, a 50-step end-to-end generation vs diffusers, then the shared kernel test suite.
# Run it through the device tool with carry [".whl"] and timeout_s >= 480, after, once, on this machine:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata lazy-importer
# and, for the tokamax rows of the attention benchmark and the shared kernel suite (optional; ~27 MB):
#   pip download ... --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl tokamax==0.0.17 \
#       einshape qwix pydantic pydantic_core annotated_types typing_inspection xprof fire termcolor immutabledict \
#       tensorboardX jax-triton
# Writes $OUT/device_check.log (everything) and $OUT/results.md (markdown tables for benchmarks/RESULTS.md).
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
export JAX_PLATFORMS=cuda,cpu   # tests/conftest.py defaults to CPU; here the kernels must run on the GPU
export FASTVIDEO_SKIP_SUBPROCESS=1 PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
log=$out/device_check.log
export FASTVIDEO_BENCH_RESULTS=$out/results.jsonl
rm -f "$FASTVIDEO_BENCH_RESULTS"

step() {  # step SECONDS COMMAND...
  local limit=$1
  shift
  echo "== $* (limit ${limit}s)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "== rc=$rc after $((SECONDS - t0)) s" | tee -a "$log"
}

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import jax, flax, torch, diffusers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, jax.devices())"
} 2>&1 | tee -a "$log"
step 100 python3 benchmarks/dit_forward.py --preset wan2.1-1.3b-480p
step 60 python3 benchmarks/attention.py --preset wan1.3b-480p
step 80 python3 benchmarks/vae_decode.py --preset wan-480p-81f --dtype bf16
step 170 python3 benchmarks/generate.py --preset wan2.1-1.3b-480p-t5x4
step 50 python3 -m pytest -q -p no:cacheprovider --tb=short -ra --timeout 30 --maxfail=2 \
  tests/test_attention_kernels.py tests/test_attention_api.py
python3 benchmarks/summarize.py "$FASTVIDEO_BENCH_RESULTS" > "$out/results.md" 2>>"$log"
tail -c 6000 "$log"
