#!/usr/bin/env bash
# The whole GPU check in one call on a lent device machine (its image has torch, timm, scikit-learn,
# scipy, pytest; not opacus or flwr). Before the call, here, in the repo's root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl opacus==1.6.0        # (.whl/ is git-ignored)
# and call the device with carry [".whl"] and `bash bench/gpu_session.sh` (timeout_s 600).
# 1. bench/gpu.py at paper scale (rows to $OUT/gpu.json, gpu.md); 2. the test suite with
# device: auto -> the GPU (the Flower tests and the installed console script need what the image
# lacks), log in $OUT/pytest.log. Each part has its own time limit so the other still runs.
set -uo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu_info.txt"
timeout 330 python3 bench/gpu.py --out "$OUT" 2>&1 | tee "$OUT/gpu.log"
timeout 220 python3 -m pytest -q -n 8 -p no:cacheprovider --ignore=tests/test_flower.py \
  --deselect tests/test_config_cli.py::test_the_installed_console_script tests 2>&1 | tail -60 | tee "$OUT/pytest.log"
