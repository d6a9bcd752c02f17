# Source on the GPU machine at the start of every command (the machine starts bare): installs the wheels that
# benchmarks/device_prepare.sh put in .whl into /tmp/site, unpacks the official oracle (if carried) into
# .oracle/pkg only (benchmarks/gpu_util.py puts it on sys.path when a benchmark asks for it: importable everywhere,
# causal_conv1d makes transformers call its CUDA kernel on the CPU tensors of the suite's peer tests), puts
# /tmp/site and this checkout on PYTHONPATH and installs the package in place. The device's own torch, Triton and
# numpy are used as they are.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v "Running pip as the 'root' user" || true
if ls .oracle/*.whl >/dev/null 2>&1; then
  mkdir -p .oracle/pkg
  for z in .oracle/causal_conv1d-*.zip .oracle/mamba_ssm-*.whl; do
    python3 -m zipfile -e "$z" .oracle/pkg
  done
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "Running pip as the 'root' user" || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
