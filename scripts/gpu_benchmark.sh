#!/usr/bin/env bash
# GPU checks for a machine with an accelerator, in one call: parity at precision 'highest' on
# the GPU, then the side-by-side benchmark (this library's jit vs PyTorch eager on the same GPU)
# in fp32 and bf16 at batch 1..256, then whether the input pipeline keeps up at batch 256 with
# 16 workers (skipped where Grain is not installed). Nothing is installed or downloaded: the
# repository is used in place (PYTHONPATH), with the jax, torch, torchvision, flax, optax,
# safetensors and Pillow already in the environment. Sized to finish within about 8 minutes on one H100/H200-class GPU
# for steps 1-2; step 3 adds an estimated 2-3 minutes (not yet run on a GPU).
#
#   scripts/gpu_benchmark.sh OUTDIR [--dry-run] [--models A,B] [--batches 1,8,64,256]
#
# OUTDIR receives gpu_benchmark.md (the tables), gpu_benchmark_<dtype>.json (every number),
# gpu_pipeline.json and parity.log. --dry-run runs the same steps on the CPU at toy sizes (resnet18, 32x32, batch
# 1,2), so CI can check the script end to end without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

OUTDIR="${1:?usage: scripts/gpu_benchmark.sh OUTDIR [--dry-run] [--models M] [--batches B]}"
shift
DRY_RUN=0
MODELS="resnet50,resnext50_32x4d,resnext101_32x8d"
BATCHES="1,8,64,256"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --models) MODELS="$2"; shift ;;
    --batches) BATCHES="$2"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
DOC="$OUTDIR/gpu_benchmark.md"

if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu; MODELS=resnet18; BATCHES="1,2"; SIZE=32; REPEATS=1; WARMUP=1
  PARITY=(tests/test_parity.py -k "resnet18 and cpu and odd_size")
  PIPELINE=(--workers 0 --threads 1 --batch-size 4 --model resnet18 --images 16 --size 32
            --rounds 1)
else
  DEVICE=cuda; SIZE=224; REPEATS=10; WARMUP=3
  PIPELINE=(--workers 8,16 --threads 1 --batch-size 256 --model resnet50 --images 1024
            --passes 16 --rounds 2)
  PARITY=(tests/test_parity.py -m accelerator -k "resnet50 or resnext50_32x4d or resnet18")
  "$PYTHON" - <<'PY'
import jax, torch
assert jax.default_backend() == "gpu", f"JAX sees no GPU: {jax.devices()}"
assert torch.cuda.is_available(), "PyTorch sees no GPU"
print("JAX:", jax.devices(), "torch:", torch.cuda.get_device_name(0))
PY
fi

# 1. Parity at precision 'highest', torch TF32 off (both set by tests/conftest.py).
status=0
"$PYTHON" -m pytest -q -x -p no:cacheprovider "${PARITY[@]}" 2>&1 | tee "$OUTDIR/parity.log" \
  || status=1

# 2. Benchmark at default precision (what users get) in fp32 and bf16.
{
  echo "# GPU inference benchmark"
  echo
  echo "\`scripts/gpu_benchmark.sh\` on $(date -u +%Y-%m-%dT%H:%MZ), device $DEVICE."
  echo "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true)"
  echo
  echo "JAX side: \`optimize_for_inference\` (BatchNorm folded), jitted; XLA's native convs"
  echo "(\`ConvPolicy\` chooses them on every backend but the CPU). PyTorch: eager, NCHW and"
  echo "channels_last; the ratio is over the faster. Default matmul precision on both sides."
  echo "Parity (precision 'highest'): $( [ $status = 0 ] && echo passed || echo FAILED, see parity.log)."
} > "$DOC"
for DTYPE in float32 bfloat16; do
  echo -e "\n## $DTYPE\n" >> "$DOC"
  "$PYTHON" benchmarks/benchmark.py --device "$DEVICE" --models "$MODELS" \
    --batch-sizes "$BATCHES" --size "$SIZE" --dtype "$DTYPE" --repeats "$REPEATS" \
    --warmup "$WARMUP" --markdown "$DOC" --json "$OUTDIR/gpu_benchmark_$DTYPE.json"
done

# 3. Does the input pipeline keep up? Grain decoding ImageNet-sized JPEGs (500x375, 256/224
# preprocessing) per worker count vs the model alone vs `evaluate` end to end (docs/data.md,
# "Throughput", says how to read it). Grain is an extra: without it the step says so.
if "$PYTHON" -c "import grain" 2>/dev/null; then
  {
    echo -e "\n## Input pipeline\n"
    echo '```'
    "$PYTHON" benchmarks/data_pipeline.py "${PIPELINE[@]}" --json "$OUTDIR/gpu_pipeline.json"
    echo '```'
  } >> "$DOC"
else
  echo -e "\n## Input pipeline\n\nskipped: grain is not installed" >> "$DOC"
fi
echo "wrote $DOC"
exit $status
