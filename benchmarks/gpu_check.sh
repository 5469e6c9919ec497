#!/usr/bin/env bash
# The GPU check of the JAX backend, in one run of under 8 minutes on a machine with an NVIDIA GPU:
# the backend-equivalence tests with JAX on the GPU, then the training speed for
# rsc15_xe_shared_100_best (batch 32 and 256) and retailrocket_bprmax_shared_best.
#
# Nothing is downloaded there: the wheels travel in .whl/ (git-ignored; see below) and the data in
# DATA (default ../shared/data; a folder inside the repo when only the repo travels).
# Prepare on a machine with pip, from the repo root:
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_27_x86_64 \
#       -d .whl 'jax[cuda12]' pytensor pandas numpy tqdm scipy pytest hypothesis
#   mkdir -p .gpudata && cp ../shared/data/{yoochoose1_64,retailrocket}_train_full.tsv.gz .gpudata/
# Run there:  DATA=.gpudata bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
export PYTHONUNBUFFERED=1

if compgen -G '.whl/*.whl' >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gru4rec-site .whl/*.whl
    export PYTHONPATH=/tmp/gru4rec-site
fi
python3 -c 'import jax; print("JAX devices:", jax.devices())'

echo '== backend equivalence (JAX on the GPU against the C backend on the CPU)'
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_backends.py

echo '== training speed, JAX backend'
for batch in 32 256; do
    timeout 90 python3 benchmarks/train_speed.py --data "$DATA/yoochoose1_64_train_full.tsv.gz" --backend jax \
        -pf paramfiles/rsc15_xe_shared_100_best.py -ps "batch_size=$batch" --steps 3000
done
timeout 90 python3 benchmarks/train_speed.py --data "$DATA/retailrocket_train_full.tsv.gz" --backend jax \
    -pf paramfiles/retailrocket_bprmax_shared_best.py --steps 2000
