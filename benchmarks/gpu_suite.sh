#!/usr/bin/env bash
# Every speed benchmark of the project, on one lent GPU (an H100/H200), within a total time budget
# (SUITE_BUDGET seconds, default 480: the 8 minutes the speed issue asks for). Each step has its own time
# limit, cut to what the budget has left, so one that fails or overruns does not stop the others; a step
# the budget has no room left for is skipped. Writes under $OUT: suite.json (all results, one key per
# benchmark, plus "suite": each step's wall time, limit and exit status, and the total), suite.log (their
# output) and end_to_end's profile tables (end_to_end.VARIANT.profile.txt). Not yet run whole on a GPU
# with this budget: the per-step times in suite.json are what tells whether 480 s is enough for every step.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh                 # on the GPU machine
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_suite.sh       # tiny sizes on the CPU: checks the script runs
#   STEPS="knn end_to_end" OUT=/tmp/gpu bash benchmarks/gpu_suite.sh   # only the steps named
#   ORIGINAL=/path/to/dino/vision_transformer.py ...  # also the original architecture in train_step
#   CHECKS=decode,augment TTA_ARGS="--minutes 1 -- ..." TTA_LIMIT=120 PIPE_ARGS="..." SUITE_BUDGET=900
#
# Needs: the package importable (installed, or this checkout's src/ — added to PYTHONPATH here), its
# dependencies, and the CIFAR-10 tarball: ../shared/data/ beside the checkout, or $DINO_SHARED_DATA.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dino-suite.XXXXXX")
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/suite.log
: > "$LOG"
SUITE_START=$(date +%s)
BUDGET=${SUITE_BUDGET:-480}
[ "$SMOKE" = 1 ] && BUDGET=${SUITE_BUDGET:-1200}  # a 2-core CPU takes about 5 minutes for the tiny sizes
export SUITE_START BUDGET

STEPS=${STEPS:-}
ORIG=()
WITH_ORIG=""
[ -n "${ORIGINAL:-}" ] && ORIG=(--original "$ORIGINAL") && WITH_ORIG=",original"

merge() {  # all results so far into $OUT/suite.json (after every step: a killed suite keeps what it measured)
  "$PY" - "$WORK" "$OUT/suite.json" <<'EOF'
import json, os, sys, time
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
suite = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
steps = {}
timings = work / "steps.tsv"  # name, limit, seconds, exit status (124/137: out of time; "-": skipped)
if timings.exists():
    for line in timings.read_text().splitlines():
        name, limit, seconds, status = line.split("\t")
        steps[name] = {"limit_s": int(limit), "seconds": int(seconds), "exit": status}
total = int(time.time()) - int(os.environ["SUITE_START"])
suite["suite"] = {"budget_s": int(os.environ["BUDGET"]), "total_s": total, "steps": steps}
out.write_text(json.dumps(suite, indent=2) + "\n")
print(f"{len(suite) - 1} results in {out} after {total} s: {', '.join(k for k in suite if k != 'suite')}")
EOF
}

step() {  # step NAME SECONDS COMMAND...: runs it with a time limit (cut to the budget left), output to the log
  local name=$1 limit=$2
  shift 2
  if [ -n "$STEPS" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  local left=$(( BUDGET - ($(date +%s) - SUITE_START) ))
  if [ "$left" -lt 25 ]; then
    echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left" | tee -a "$LOG"
    printf '%s\t%s\t0\t-\n' "$name" "$limit" >> "$WORK/steps.tsv"
    merge >> "$LOG" 2>&1
    return
  fi
  left=$(( left - 10 ))  # timeout's --kill-after grace comes on top of the limit
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  local t0
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  echo "=== $name: exit $rc after ${took}s" | tee -a "$LOG"
  printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$took" "$rc" >> "$WORK/steps.tsv"
  merge >> "$LOG" 2>&1
  cp "$WORK"/*.profile.txt "$OUT"/ 2> /dev/null  # end_to_end's operator tables, kept if a later step is killed
}

"$PY" - >> "$LOG" 2>&1 <<'EOF'
import torch, platform
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor())
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG"

if [ "$SMOKE" = 1 ]; then  # the same steps at sizes a laptop CPU finishes in a few minutes
  VITS="--arch vit_tiny --patch 16 --batch 2 --local-crops 2 --out-dim 1024 --steps 2 --warmup 1"
  VITB="--arch vit_tiny --patch 16 --batch 2 --local-crops 2 --out-dim 1024 --steps 2 --warmup 1"
  VITB8="--arch vit_tiny --patch 16 --batch 2 --local-crops 2 --out-dim 1024 --steps 1 --warmup 1 --variants ours --activation-checkpointing"
  JPEGS=256 E2E="--config cifar_small --images 256 --epochs 2 --batch 32 --workers 2 --log-every 2 --profile-steps 3"
  PIPE="--images 128 --batch 32 --workers 0,2 --seconds 2"
  TTA="--epochs 1 --holdout 50 --bank 50 --train-per-class 50 --variants ours,plain -- run.batch_size=32"
  KNN="--bank 20000 --queries 200 --seconds 2"
else
  VITS="--arch vit_small --patch 16 --batch 64 --local-crops 8 --out-dim 65536 --steps 20 --warmup 6"
  VITB="--arch vit_base --patch 16 --batch 64 --local-crops 10 --out-dim 65536 --steps 8 --warmup 5"
  VITB8="--arch vit_base --patch 8 --batch 64 --local-crops 10 --out-dim 65536 --steps 3 --warmup 2 --variants ours --activation-checkpointing"
  JPEGS=2048 E2E="--images 2048 --epochs 2 --batch 64 --workers 16 --variants compiled,ours,plain --profile-steps 5"
  PIPE=${PIPE_ARGS:-"--images 2048 --batch 64 --workers 8,16 --tensor-workers 8 --seconds 6"}
  # Fixed epochs (no speed probe) on 10,000 training images, both variants eager (a ResNet compile would
  # take a minute of the budget; the compiled preset's own figure comes from the 10-minute run).
  TTA=${TTA_ARGS:-"--config cifar_resnet18 --epochs 4 --train-per-class 1000 --variants ours,plain -- run.compile=false"}
  KNN="--bank 1000000 --queries 20000 --seconds 5"
fi

B=benchmarks
# compiled = run.compile=true run.compile_mode=reduce-overhead (CUDA graphs); the compiled graphs land in
# inductor's on-disk cache, which end_to_end's compiled run then reuses.
COMPILED="--compile-mode reduce-overhead"
[ "$SMOKE" = 1 ] && COMPILED="--compile-mode default"  # compiling on a CPU takes minutes: checked elsewhere
V="ours,plain$WITH_ORIG"
[ "$SMOKE" = 1 ] || V="compiled,$V"
# In order of what the speed issue's targets need; whatever the budget has no room left for is skipped.
step train_step_vits16 150 "$PY" $B/train_step.py $VITS --variants $V $COMPILED "${ORIG[@]}" --out "$WORK/train_step_vits16.json"
if [ -z "$STEPS" ] || [[ " $STEPS " == *" gpu_checks "* ]] || [[ " $STEPS " == *" data_pipeline "* ]] \
    || [[ " $STEPS " == *" end_to_end "* ]]; then  # the JPEG files these three read
  STEPS="" step make_jpegs 60 "$PY" -c "import sys; sys.path.insert(0, '$B'); from pathlib import Path; from _common import imagenet_sized_jpegs; imagenet_sized_jpegs(Path('$WORK/jpegs'), $JPEGS)"
fi
step end_to_end 150 "$PY" $B/end_to_end.py --data "$WORK/jpegs" --scratch "$WORK" $E2E --out "$WORK/end_to_end.json"
step train_step_vitb16 150 "$PY" $B/train_step.py $VITB --variants $V $COMPILED "${ORIG[@]}" --out "$WORK/train_step_vitb16.json"
step data_pipeline 90 "$PY" $B/data_pipeline.py --data "$WORK/jpegs" $PIPE --out "$WORK/data_pipeline.json"
step knn 60 "$PY" $B/knn.py $KNN --out "$WORK/knn.json"
step time_to_accuracy ${TTA_LIMIT:-150} "$PY" $B/time_to_accuracy.py --scratch "$WORK/cifar" --out "$WORK/time_to_accuracy.json" $TTA
step train_step_vitb8_ckpt 60 "$PY" $B/train_step.py $VITB8 --out "$WORK/train_step_vitb8_ckpt.json"
CHECKS_DEFAULT=decode,augment,precision,guard,compile,compile_drop_path
[ "$SMOKE" = 1 ] && CHECKS_DEFAULT=decode,augment,precision,guard  # compile: minutes on a CPU; tests cover it
step gpu_checks 150 "$PY" $B/gpu_checks.py --jpegs "$WORK/jpegs" --checks "${CHECKS:-$CHECKS_DEFAULT}" --out "$WORK/gpu_checks.json"

merge
rm -rf "$WORK"
