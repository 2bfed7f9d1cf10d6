#!/usr/bin/env bash
# One prepared script for a session that is lent an H200: the shared kernel test suite on real hardware, then
# the GPU benchmarks, each with its own time limit (about 12 minutes in all). Run it through the device tool
# with carry [".whl"] after, once, on this machine:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata lazy-importer \
#       pytest pluggy iniconfig
# Output goes to stdout and, when $OUT is set, to $OUT/device_check.log.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
export JAX_PLATFORMS=cuda,cpu   # tests/conftest.py defaults to CPU; here the kernels must run on the GPU
export FASTVIDEO_SKIP_SUBPROCESS=1
log=${OUT:-/tmp}/device_check.log

step() {  # step SECONDS COMMAND...
  local limit=$1
  shift
  echo "== $* (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tail -60 | tee -a "$log"
}

python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$log"
step 150 python3 -m pytest -q tests/test_attention_kernels.py tests/test_attention_api.py tests/test_wan_sta.py
step 180 python3 benchmarks/attention.py --preset wan1.3b-480p
step 200 python3 benchmarks/dit_forward.py --preset wan2.1-1.3b-480p
step 150 python3 benchmarks/vae_decode.py --preset wan-480p-81f
