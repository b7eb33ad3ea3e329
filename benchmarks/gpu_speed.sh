#!/usr/bin/env bash
# The GPU measurements of the "Speed on the GPU" issue, as one prepared script (docs/benchmarks.md).
# Run from the project root on a CUDA machine, after ../shared/gpu/pack.sh has packed .gpu/ here:
#
#   benchmarks/gpu_speed.sh [STAGE ...]     # stages: before switches stable prn18 learn stability table1
#                                           # (default: before switches; issue 8's GPU checks: stability learn)
#
# Each stage writes its bench.md/bench.json (or learn.md/json/png) under $OUT (default gpu_out/). Nothing
# here needs MLflow or Optuna. Every switch is off by default in the code; the stages turn them on one at a
# time against the same run's baseline, so "before" and "after" are measured on the same machine.
set -euo pipefail
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
if [ -d .gpu/site ]; then export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"; fi
if [ -d .gpu/data ]; then export ROBUSTFLOW_DATA="${ROBUSTFLOW_DATA:-$PWD/.gpu/data}"; fi
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/machine.txt"

# The command: five methods on WRN-34-10 + the LBGAT guide, batch 128, bf16 + channels_last.
WRN=(--methods d2r_cag_cifar10,lbgat_cifar10,trades_cifar10,pgd_at_cifar10,regmix_cifar10
     --target wrn34_10 --guide resnet18_lbgat --batch-size 128 --steps 20 --warmup 5
     --eval-images 512 --eval-batch-size 256)
# Methods with a PreActResNet-18 target (the launch-bound regime).
PRN=(--methods pgd_at_cifar10,trades_cifar10,regmix_cifar10,d2r_cag_cifar10
     --target preact_resnet18 --guide resnet18_lbgat --batch-size 128 --steps 50 --warmup 10
     --eval-images 1024 --eval-batch-size 256 --no-reference)

stage_before() {  # the fixed bench (config schedules, NON-FINITE marking), no speed switch: the baseline
  python -m pipeline.bench "${WRN[@]}" --compare-fast-path --out "$OUT/wrn_before"
}
stage_switches() {  # cuDNN autotuning, then torch.compile (+ autotuning), each against the baseline above
  python -m pipeline.bench "${WRN[@]}" --cudnn-benchmark --no-reference --out "$OUT/wrn_cudnn"
  python -m pipeline.bench "${WRN[@]}" --cudnn-benchmark --compile --warmup 10 --no-reference \
    --out "$OUT/wrn_compile"
}
stage_stable() {  # the fast-path comparison on configs that do not diverge: every method under gin/stable.gin
  if [ -f gin/stable.gin ]; then
    python -m pipeline.bench "${WRN[@]}" --profile stable --compare-fast-path --no-reference --out "$OUT/wrn_stable"
  else
    echo "gin/stable.gin not found: stage stable skipped"
  fi
}
stage_prn18() {
  python -m pipeline.bench "${PRN[@]}" --out "$OUT/prn18_before"
  python -m pipeline.bench "${PRN[@]}" --cudnn-benchmark --compile --warmup 15 --out "$OUT/prn18_compile"
}
stage_stability() {  # issue 8 (a): the authors' D2R-CAG (WRN-34-10 + LBGAT guide, batch 128): 1 epoch at 0.02,
  # then 300 steps at 0.1, robustflow's step (bf16) beside the authors' loop (fp32), same weights and batches
  python -m benchmarks.stability --methods d2r_cag_cifar10 --targets wrn34_10 --guide resnet18_lbgat \
    --batch-size 128 --phases 0.02:391,0.1:300 --device cuda --out "$OUT/stability_wrn" || true
  python -m benchmarks.stability --methods d2r_cag_cifar10,lbgat_cifar10,trades_cifar10 --targets wrn34_10 \
    --batch-size 128 --phases 0.1:300 --profile stable --no-reference --device cuda --out "$OUT/stability_wrn_stable" || true
}

stage_learn() {  # issue 8's learning check: every method, PreActResNet-18, 5 epochs of 19,000 images
  python -m pipeline.learn --target preact_resnet18 --guide resnet18_lbgat --epochs 5 --train-size 19000 \
    --val-size 1000 --batch-size 128 --attack-steps config --out "$OUT/learn_prn18" || true
  if [ -f gin/stable.gin ]; then
    python -m pipeline.learn --target preact_resnet18 --guide resnet18_lbgat --epochs 5 --train-size 19000 \
      --val-size 1000 --batch-size 128 --attack-steps config --profile stable --out "$OUT/learn_prn18_stable" || true
  fi
}

stage_table1() {  # issue 16's GPU check: the D2R Table-1 CIFAR-10 rows on PreActResNet-18, 3 epochs each, through
  # Trainer.fit (no MLflow on the GPU machine); the rows' experiments as gin/tables/d2r_table1_cifar10.gin lists them
  python -m pipeline.learn --methods pgd_at_cifar10,trades_cifar10,mart_cifar10,lbgat_cifar10,fat_cifar10,gairat_cifar10,pgd_at_awp_cifar10,las_at_cifar10,rat_trades_cifar10,sat_cifar10,d2r_cag_cifar10 \
    --target preact_resnet18 --guide resnet18_lbgat --epochs 3 --train-size 19000 --val-size 1000 \
    --batch-size 128 --attack-steps config --out "$OUT/table1_prn18" || true
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(before switches)
for s in "${stages[@]}"; do
  echo "=== stage $s ($(date -u +%H:%M:%S))"
  "stage_$s"
done
echo "=== done ($(date -u +%H:%M:%S)); results in $OUT/"
