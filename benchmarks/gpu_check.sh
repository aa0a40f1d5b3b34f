#!/usr/bin/env bash
# The GPU path end to end, in one short script (about 5 minutes on one GPU), from the repository root:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # OUT_DIR: where figures and logs go (default runs/gpu_check)
#   REFNET_ALLOW_CPU=1 bash benchmarks/gpu_check.sh  # the same on CPU, to check the script itself
#
# Needs a JAX with CUDA (`pip install -U "jax[cuda12]"` into the project's environment, then the install of
# the README's first command). Steps, each failing loudly:
#   1. the backend is a GPU (its name goes into the log);
#   2. train.py on the tiny easy-VQA config in float32 and in bfloat16, on every GPU (data parallel), and once
#      with parameters sharded over all of them (config.mesh.fsdp = device count) when there are several;
#      each must write results.json with a finite test loss;
#   3. the train-step benchmark of the default easy-VQA config, float32 and bfloat16 (examples/s, compile
#      time, compiled memory), and the MS-loss benchmark's JAX sides at B = 1,024 to 16,384, as JSON and
#      markdown tables in OUT_DIR, for docs/BENCHMARKS.md.
set -euo pipefail

out="${1:-runs/gpu_check}"
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$log"; }

backend=$(python -c 'import jax; print(jax.default_backend())')
devices=$(python -c 'import jax; print(jax.device_count())')
kind=$(python -c 'import jax; print(jax.devices()[0].device_kind)')
say "backend $backend, $devices device(s): $kind"
if [[ "$backend" != gpu && -z "${REFNET_ALLOW_CPU:-}" ]]; then
  say "no GPU backend (set REFNET_ALLOW_CPU=1 to run the script on CPU anyway)"
  exit 1
fi

train_tiny() {  # name, extra flags...
  local name=$1
  shift
  local workdir="$out/train-$name"
  rm -rf "$workdir"
  say "train.py tiny ($name)"
  python train.py --config configs/easy_vqa.py:tiny --workdir "$workdir" "$@" >> "$log" 2>&1
  python - "$workdir/results.json" "$name" <<'EOF' | tee -a "$log"
import json, math, sys
results = json.load(open(sys.argv[1]))
loss = results['test']['loss']
assert math.isfinite(loss), f'{sys.argv[2]}: test loss {loss}'
print(f"  {sys.argv[2]}: test accuracy {results['test']['accuracy']:.4f}, loss {loss:.4f}")
EOF
}

train_tiny f32
train_tiny bf16 --config.model.dtype=bfloat16
if (( devices > 1 )); then
  train_tiny fsdp --config.mesh.fsdp="$devices" --config.train.batch_size=$((8 * devices))
fi

say "train-step benchmark (float32, bfloat16)"
python benchmarks/train_step.py --config configs/easy_vqa.py --json "$out/train_step_f32.json" \
  > "$out/train_step_f32.md" 2>> "$log"
python benchmarks/train_step.py --config configs/easy_vqa.py --set model.dtype=bfloat16 \
  --json "$out/train_step_bf16.json" > "$out/train_step_bf16.md" 2>> "$log"
say "MS-loss benchmark (JAX sides)"
python benchmarks/ms_loss.py --batches 1024,4096,16384 --sides jax-dense,jax-blocked,floor-dense \
  --json "$out/ms_loss.json" > "$out/ms_loss.md" 2>> "$log"
cat "$out"/train_step_*.md "$out/ms_loss.md" | grep -E '^\||^\*\*' | tee -a "$log"
say "done: figures in $out"
