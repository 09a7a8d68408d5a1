#!/usr/bin/env bash
# Everything we check on a lent GPU machine, in one go: the GPU tests, `rwkv doctor`, the GPU
# benchmark against the official package and the batched decode benchmark. Logs go to $OUT (or
# ./gpu-logs).
#
#   bash benchmarks/gpu_session.sh [tests|doctor|bench|batch|all] [extra bench_vs_official.py args]
#   (TESTS_MATCHING="not official" selects tests, as pytest -k; TEST_TIMEOUT bounds them, in s)
#
# Such machines have torch and CUDA but may lack our other dependencies: put their wheels in
# .whl/ (see the device notes) and they are installed into /tmp/site first. An H100 image with
# torch 2.11 needed: typer, pydantic, pydantic-core, annotated-types, annotated-doc,
# typing-inspection, typing_extensions, click, shellingham, huggingface_hub (2.x), httpx2,
# httpcore2, truststore, hf-xet, prompt_toolkit, wcwidth and rwkv (the official package).
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
shift || true
out="${OUT:-gpu-logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

if [[ $what == all || $what == doctor ]]; then
    echo "== rwkv doctor"
    python3 -m rwkv_cli doctor 2>&1 | tee "$out/doctor.txt"
fi
if [[ $what == all || $what == tests ]]; then
    echo "== pytest -m cuda"
    timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -m cuda -q -p no:cacheprovider \
        --junitxml="$out/cuda-tests.xml" ${TESTS_MATCHING:+-k "$TESTS_MATCHING"} 2>&1 \
        | tee "$out/cuda-tests.txt" | tail -40
fi
if [[ $what == all || $what == bench ]]; then
    echo "== benchmarks/bench_vs_official.py --device cuda"
    python3 benchmarks/bench_vs_official.py --device cuda --dtypes fp16 bf16 \
        --shapes "RWKV-7 0.1B" "RWKV-7 1.5B" "$@" 2>&1 | tee "$out/bench.txt"
fi
if [[ $what == all || $what == batch ]]; then
    echo "== benchmarks/bench_batch.py --device cuda"
    python3 benchmarks/bench_batch.py --device cuda --dtype fp16 --tokens 64 \
        --sizes 1 2 3 4 8 16 32 64 2>&1 | tee "$out/bench-batch.txt"
fi
