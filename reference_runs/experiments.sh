#!/usr/bin/env bash
# Experiments 1-3 (label diversity, layout diversity, caption modes) and the analysis runs.
# Every sweep pins the settings chosen by the search (search.sh) explicitly, so the commands
# reproduce these numbers whatever the package defaults become. Seeds 0-4, 2 worker processes.
set -euo pipefail
cd "$(dirname "$0")"
CHOSEN=(--init clip --embed_scale none --lr 0.001 --weight_decay 0 --steps 1500
        --batch_size 128)
sweep() { local name=$1; shift; minispatial sweep --seeds 0-4 --workers 2 --quiet --out "$name" "$@"; }

# 1. label diversity: n_pair 5..15 at n_layout 20; unseen pairs with both labels held out (paper's
#    default) and, as a variant, with one held out
sweep label_diversity --grid n_pair=5,7,9,11,13,15 --grid unseen_mode=both,one --n_layout 20 "${CHOSEN[@]}"

# 2. layout diversity: n_layout 1..40 at n_pair 15 (high) and 5 (low)
sweep layout_diversity --grid n_layout=1,2,5,10,20,40 --grid n_pair=5,15 "${CHOSEN[@]}"

# 3. caption modes: left-only and left+right captions, 1- and 2-layer text towers
sweep caption_modes --grid caption_mode=left,left+right --grid text_layers=1,2 --grid n_pair=5,15 \
  --n_layout 20 "${CHOSEN[@]}"

# analysis (docs/paper.md §6) on the label-diversity checkpoints: generalising (n_pair 15) vs not (5)
mkdir -p analysis
for np in 15 5; do
  minispatial analyze label_diversity/runs/n_pair=${np}__unseen_mode=both__seed=* \
    --ablate none --ablate EP --ablate PE --ablate PP --ablate BP --ablate EP,VP --ablate VP --ablate POS,VP \
    --out analysis/full/n_pair${np}.json --plots analysis/figures_n_pair${np} > analysis/n_pair${np}.txt
done
# a model that generalises poorly for another reason: the search's PyTorch-default initialisation
for np in 15 5; do
  minispatial analyze search/init/runs/init=torch__n_pair=${np}__embed_scale=none__seed=* \
    --ablate none --ablate EP --ablate PE --ablate PP --ablate BP --ablate EP,VP --ablate VP --ablate POS,VP \
    --out analysis/full/torch_init_n_pair${np}.json --plots analysis/figures_torch_init_n_pair${np} \
    > analysis/torch_init_n_pair${np}.txt
done
# the tables of reference_runs/README.md (and the small analysis/*.summary.json committed)
python3 analysis_tables.py > analysis/tables.md
