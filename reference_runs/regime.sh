#!/usr/bin/env bash
# When does the paper's label-diversity claim hold? The regime map and the sweeps against the same
# contrast (n_pair 15 vs 5, unseen-pair left-right accuracy). Fresh seeds 10-19: the search
# (search.sh) and experiments 1-4 (experiments.sh) chose and reported on seeds 0-4.
# init=scaled: every weight's std is std_clip^(1-a) * std_torch^a, a = init_scale (docs/model.md).
set -euo pipefail
cd "$(dirname "$0")"
SEEDS=${SEEDS:-10-19}
BASE=(--n_layout 20 --weight_decay 0 --decay_embeddings false --embed_scale none --unseen_mode both)
sweep() { local name=$1; shift; minispatial sweep --seeds "$SEEDS" --workers 2 --quiet --out "regime/$name" "$@"; }

# 1. the map: init scale x n_pair at the default budget (lr 1e-3, 1500 steps, batch 128)
sweep map --grid init_scale=0,0.25,0.5,0.75,1 --grid n_pair=5,7,9,11,15 \
  --init scaled --lr 0.001 --steps 1500 --batch_size 128 "${BASE[@]}"
# 2. the training budget: lr 3e-3 x 5000 steps (where n_pair 15 saturated under torch init in the search)
sweep budget --grid init_scale=0,0.5,0.75,1 --grid n_pair=5,15 \
  --init scaled --lr 0.003 --steps 5000 --batch_size 128 "${BASE[@]}"
# 3. batch construction: distinct scenes (ours) vs uniform images with repeated captions (plain CLIP)
sweep sampler --grid sampler=distinct,uniform --grid batch_size=128,512 --grid n_pair=5,15 \
  --init clip --lr 0.001 --steps 1500 "${BASE[@]}"
# 4. data composition: single-object layouts per label; labels that only ever appear alone
sweep single_layouts --grid n_single_layout=1,2,5 --grid n_pair=5,15 \
  --init clip --lr 0.001 --steps 1500 --batch_size 128 "${BASE[@]}"
sweep n_labels --grid n_labels=10,20 --n_pair 5 \
  --init clip --lr 0.001 --steps 1500 --batch_size 128 "${BASE[@]}"

# 5. the mechanism where n_pair 15 generalises and 5 does not (a = 0.75, the map's budget)
for np in 15 5; do
  minispatial analyze regime/map/runs/init_scale=0.75__n_pair=${np}__seed=* \
    --ablate none --ablate EP --ablate PE --ablate PP --ablate BP --ablate EP,VP --ablate VP \
    --out analysis/full/regime_a075_n_pair${np}.json --plots analysis/figures_regime_a075_n_pair${np} \
    > analysis/regime_a075_n_pair${np}.txt
done
# the paired contrasts of experiment 5: contrasts.sh (regime.*)

# 6. epoch-matched training: the same passes over the training split instead of the same steps.
#    Passes = steps x batch / N: n_pair 15 at 1500 steps x 128 / 4300 = 44.7; n_pair 5 (batch
#    capped at its 40 scenes, N 500) at 1500 steps = 120. Matched: n_pair 5 at 558 steps (44.7
#    passes) and n_pair 15 at 4031 steps (120 passes).
sweep epochs_5 --grid n_pair=5 --grid steps=558,1500 --init clip --lr 0.001 --batch_size 128 "${BASE[@]}"
sweep epochs_15 --grid n_pair=15 --grid steps=1500,4031 --init clip --lr 0.001 --batch_size 128 "${BASE[@]}"
# 7. the unseen-pair definition: both labels held out (default) or one, at 10 seeds
minispatial sweep --seeds "$SEEDS" --workers 2 --quiet --out regime/unseen_mode \
  --grid unseen_mode=both,one --grid n_pair=5,15 --init clip --lr 0.001 --steps 1500 --batch_size 128 \
  --n_layout 20 --weight_decay 0 --decay_embeddings false --embed_scale none
# 8. a longer budget where PyTorch-scale initialisations had not saturated: lr 3e-3 x 15000 steps
sweep budget_long --grid init_scale=0.75,1 --grid n_pair=5,15 \
  --init scaled --lr 0.003 --steps 15000 --batch_size 128 "${BASE[@]}"
