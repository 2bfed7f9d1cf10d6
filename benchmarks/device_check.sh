#!/usr/bin/env bash
# One prepared script for a session that is lent an H200, sized for ONE device call of at most 8 minutes
# (part 1's limits sum to 470 s), most important figures first. Part 1 (default): DiT forward vs diffusers,
# dense / Sage attention rates, the sparse kernels (top-k block-sparse, VSA) vs dense, the 1.3B training step,
# Sage's end-to-end PSNR, then the shared kernel test suites on the GPU. Part 2 (`device_check.sh 2`, a second
# call if time is left): VAE decodes (Wan, StepVideo) vs the PyTorch peers and a 50-step generation vs diffusers.
# Run it through the device tool with carry [".whl"] and timeout_s >= 500, after, once, on this machine:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata lazy-importer
# and, for the tokamax rows of the attention benchmark and the shared kernel suite (optional; ~27 MB):
#   pip download ... --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl tokamax==0.0.17 \
#       einshape qwix pydantic pydantic_core annotated_types typing_inspection xprof fire termcolor immutabledict \
#       tensorboardX jax-triton
# and for the training step (grain, array_record: the image may lack them):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl grain==0.2.18 array_record==0.8.6
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
part=${1:-1}
kernels="tests/test_attention_kernels.py tests/test_attention_api.py tests/test_topk_block_sparse.py \
  tests/test_sage_kernels.py tests/test_video_sparse.py"
if [ "$part" = 1 ]; then
  step 80 python3 benchmarks/dit_forward.py --preset wan2.1-1.3b-480p
  step 60 python3 benchmarks/attention.py --preset wan1.3b-480p \
    --backends cudnn,pallas_gpu_mosaic,pallas_gpu_triton,sage_attn
  step 70 python3 benchmarks/attention.py --preset wan1.3b-480p --backends cudnn,pallas_gpu,video_sparse_attn
  step 80 python3 benchmarks/train_step.py --model 1.3b --batch 1 --steps 3
  step 90 python3 benchmarks/sage_psnr.py --preset wan2.1-1.3b-480p-t5x4
  step 90 python3 -m pytest -q -p no:cacheprovider --tb=short -ra --timeout 60 --maxfail=3 $kernels
else
  step 80 python3 benchmarks/vae_decode.py --preset wan-480p-81f --dtype bf16
  step 80 python3 benchmarks/vae_decode.py --preset stepvideo-544p-204f --dtype bf16
  step 170 python3 benchmarks/generate.py --preset wan2.1-1.3b-480p-t5x4
  step 60 python3 benchmarks/attention.py --preset wan14b-720p --backends cudnn,pallas_gpu,video_sparse_attn
fi
python3 benchmarks/summarize.py "$FASTVIDEO_BENCH_RESULTS" > "$out/results.md" 2>>"$log"
tail -c 6000 "$log"
