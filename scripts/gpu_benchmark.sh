#!/usr/bin/env bash
# GPU checks for a lent accelerator machine: parity at precision 'highest', then the side-by-side
# benchmark (this library's jit vs PyTorch eager on the same GPU) in fp32 and bf16 at batch
# 1..256, then the input pipeline at batch 256 with 16 workers. Results go to
# docs/performance_gpu.md (JSON to $OUT, or /tmp). The defaults are sized for a 15-minute
# device budget (an estimate: this script has not yet run on a GPU).
# Usage: scripts/gpu_benchmark.sh [MODELS] [BATCHES]
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS="${1:-resnet50,resnext50_32x4d}"
BATCHES="${2:-1,8,64,256}"   # 1..256; add 32,128 when the device budget allows
OUTDIR="${OUT:-/tmp}"
DOC=docs/performance_gpu.md

python - <<'PY'
import jax, torch
assert jax.default_backend() == "gpu", f"JAX sees no GPU: {jax.devices()}"
assert torch.cuda.is_available(), "PyTorch sees no GPU"
print("JAX:", jax.devices(), "torch:", torch.cuda.get_device_name(0))
PY

# 1. Parity at precision 'highest', torch TF32 off (both set by tests/conftest.py).
scripts/accelerator_checks.sh -x || echo "accelerator parity tests FAILED" >&2
python -m pytest -q -x tests/test_performance_paths.py || echo "performance-path tests FAILED" >&2

# 2. Benchmark: default precision (what users get: TF32 allowed on both sides) in fp32 and bf16.
{
  echo "# GPU inference benchmark"
  echo
  echo "Written by \`scripts/gpu_benchmark.sh\` on $(date -u +%Y-%m-%dT%H:%MZ)."
  echo "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true)"
  echo
  echo "JAX side: \`optimize_for_inference\` (BatchNorm folded) jitted; XLA's native convs"
  echo "(\`resnext_flax.nn.ops.select_lowering\` keeps them on GPU). PyTorch: eager, NCHW and"
  echo "channels_last; ratio over the faster. Default matmul precision on both sides."
} > "$DOC"
for DTYPE in float32 bfloat16; do
  echo -e "\n## $DTYPE\n" >> "$DOC"
  python benchmarks/benchmark.py --device cuda --models "$MODELS" --batch-sizes "$BATCHES" \
    --dtype "$DTYPE" --repeats 10 --warmup 3 --markdown "$DOC" \
    --json "$OUTDIR/gpu_benchmark_$DTYPE.json"
done

# 3. Is the input pipeline the bottleneck? Grain workers decoding ImageNet-sized JPEGs (500x375,
# 256/224 preprocessing) vs the model alone vs `evaluate` end to end, batch 256, 16 workers
# (docs/data.md says how to read it). Grain must already be installed (no network here): bring
# it as wheels (pip download grain array-record ...) when it is missing.
if python -c "import grain" 2>/dev/null; then
  {
    echo -e "\n## Input pipeline (batch 256, resnet50, 16 workers)\n"
    echo '```'
    python benchmarks/data_pipeline.py --workers 0,8,16 --threads 1 --batch-size 256 \
      --model resnet50 --images 4096 --rounds 2 --json "$OUTDIR/gpu_pipeline.json"
    echo '```'
  } >> "$DOC"
else
  echo "grain is not installed: input-pipeline benchmark skipped" >&2
fi
echo "wrote $DOC"
