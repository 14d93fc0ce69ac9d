#!/usr/bin/env bash
# Training speed before and after a change: one epoch of the bundled sample with `dino train` from a git
# revision (unpacked into a scratch folder) and from this working tree, alternated ROUNDS times; prints each
# epoch's images/s from log.jsonl. The settings are the old cifar_small's speed-relevant ones (a 6-block
# ViT-tiny/8, 2×32² + 6×16² crops, batch 64, batched augmentation, files decoded every epoch), spelled out
# so that both trees train the same network. Take it on a quiet machine.
#
#   bash benchmarks/epoch_rate_ab.sh 6d761d3 [ROUNDS]
set -euo pipefail
rev=${1:?usage: epoch_rate_ab.sh REVISION [ROUNDS]}
rounds=${2:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git -C "$here" archive "$rev" src | tar -x -C "$scratch"
settings="model.arch=vit_tiny model.patch_size=8 model.depth=6 head.out_dim=1024 head.hidden_dim=512
  head.bottleneck_dim=128 head.use_bn=true data.in_memory=false data.augment_on=device data.num_workers=2
  run.epochs=1 run.batch_size=64 monitor.knn_every=0 run.progress_bar=never"
for round in $(seq "$rounds"); do
  for tree in before after; do
    src="$scratch/src"; [ "$tree" = after ] && src="$here/src"
    out="$scratch/run-$tree-$round"
    # shellcheck disable=SC2086
    PYTHONPATH="$src" python -m dino.cli train --config cifar_small --output "$out" --no-resume $settings \
      > /dev/null 2>&1
    python - "$out/log.jsonl" "$tree" "$round" <<'PY'
import json, sys
epoch = next(r for r in map(json.loads, open(sys.argv[1])) if r["type"] == "epoch")
print(f"{sys.argv[2]} round {sys.argv[3]}: {epoch['images_per_s']:.1f} images/s ({epoch['seconds']:.1f} s)")
PY
  done
done
uptime
