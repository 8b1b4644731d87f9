#!/usr/bin/env bash
# The paper's figures from the recorded runs (needs matplotlib: pip install 'minispatial[plot]').
# (a) sweep figures, generalisation.png included, rebuilt from the committed results.csv (no training);
# (b) the analysis figures of the label-diversity models at n_pair 15 and 5: their checkpoints are
#     not committed, so they are trained again into $TMP_SWEEP with exactly experiment 1's settings
#     (experiments.sh; seeds 0-4, unseen_mode both), checked equal to the recorded results.csv rows,
#     then analysed with experiments.sh's flags.
set -euo pipefail
cd "$(dirname "$0")"
TMP_SWEEP=${TMP_SWEEP:-/tmp/minispatial_figures/label_diversity}

# (a)
minispatial sweep --out label_diversity --replot
minispatial sweep --out layout_diversity --replot

# (b) experiment 1's settings (experiments.sh: CHOSEN, --n_layout 20), n_pair 5 and 15 only
CHOSEN=(--init clip --embed_scale none --lr 0.001 --weight_decay 0 --steps 1500 --batch_size 128)
minispatial sweep --seeds 0-4 --workers 2 --quiet --out "$TMP_SWEEP" \
  --grid n_pair=5,15 --grid unseen_mode=both --n_layout 20 "${CHOSEN[@]}"
python3 - label_diversity/results.csv "$TMP_SWEEP/results.csv" <<'PY'
import csv, sys
ref = {r["run"]: r for r in csv.DictReader(open(sys.argv[1]))}
new = list(csv.DictReader(open(sys.argv[2])))
bad = [r["run"] for r in new if any(r[k] != ref[r["run"]][k] for k in r if k != "wall_s")]
print(f"retrained {len(new)} runs: " + (f"DIFFER from the record: {bad}" if bad else
      "every summary number equal to the recorded results.csv row"))
sys.exit(1 if bad else 0)
PY
for np in 15 5; do
  minispatial analyze "$TMP_SWEEP"/runs/n_pair=${np}__unseen_mode=both__seed=* \
    --ablate none --ablate EP --ablate PE --ablate PP --ablate BP --ablate EP,VP --ablate VP --ablate POS,VP \
    --plots analysis/figures_n_pair${np} > /dev/null
done

# (c) the same figures for the search's PyTorch-default initialisation (search.sh, sweep `init`):
#     trained again into $TMP_INIT with its settings, checked against search/init/results.csv
TMP_INIT=${TMP_INIT:-/tmp/minispatial_figures/init}
minispatial sweep --seeds 0-4 --workers 2 --quiet --out "$TMP_INIT" \
  --grid init=torch --grid n_pair=5,15 --grid embed_scale=none \
  --n_layout 20 --batch_size 128 --lr 0.001 --steps 1500 --weight_decay 0 --decay_embeddings false --unseen_mode both
python3 - search/init/results.csv "$TMP_INIT/results.csv" <<'PY'
import csv, sys
ref = {r["run"]: r for r in csv.DictReader(open(sys.argv[1]))}
new = list(csv.DictReader(open(sys.argv[2])))
bad = [r["run"] for r in new if any(r[k] != ref[r["run"]][k] for k in r if k in ref[r["run"]] and k != "wall_s")]
print(f"retrained {len(new)} torch-init runs: " + (f"DIFFER from the record: {bad}" if bad else
      "every summary number equal to the recorded results.csv row"))
sys.exit(1 if bad else 0)
PY
rm -f analysis/figures_torch_init_n_pair*/vision_layer0_EP_curve_runs.png   # the misleading mean curve
for np in 15 5; do
  minispatial analyze "$TMP_INIT"/runs/init=torch__n_pair=${np}__embed_scale=none__seed=* \
    --ablate none --ablate EP --ablate PE --ablate PP --ablate BP --ablate EP,VP --ablate VP --ablate POS,VP \
    --plots analysis/figures_torch_init_n_pair${np} > /dev/null
done

# (d) text order preference against the sign of the vision EP gradient (order_vs_ep.py), on the
#     clip-init label-diversity runs of (b) and the regime runs of regime.sh part 5
for np in 15 5; do
  minispatial analyze "$TMP_SWEEP"/runs/n_pair=${np}__unseen_mode=both__seed=* --ablate none \
    --out analysis/full/clip_order_n_pair${np}.json > /dev/null
done
python3 order_vs_ep.py analysis/full/clip_order_n_pair15.json analysis/full/clip_order_n_pair5.json \
  analysis/full/regime_a075_n_pair15.json analysis/full/regime_a075_n_pair5.json > analysis/order_vs_ep.txt
