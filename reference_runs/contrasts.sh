#!/usr/bin/env bash
# Paired contrasts over seeds (python -m minispatial.tools.contrast) for the comparisons the
# README's verdicts rest on, from the committed results.csv files (no training). Each writes one
# Markdown table to contrasts/<sweep>.<contrast>.md: per cell n seeds, both levels (mean ± std),
# the paired difference A−B with its 95% t-interval, seeds each way, exact sign-flip p (n = 5:
# the smallest possible two-sided p is 2/32 = 0.0625).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p contrasts
PY=${PYTHON:-python}
UNSEEN=val_unseen_pair.lr_acc
c() { local out=$1; shift; "$PY" -m minispatial.tools.contrast "$@" --markdown > "contrasts/$out.md.tmp"; mv "contrasts/$out.md.tmp" "contrasts/$out.md"; }

# experiment 1: label diversity (by unseen_mode): 15 vs 5, the rise 5 -> 7, flat after 7
c label_diversity.n_pair_15_vs_5 label_diversity/results.csv --metric $UNSEEN --contrast n_pair=15,5
c label_diversity.n_pair_7_vs_5  label_diversity/results.csv --metric $UNSEEN --contrast n_pair=7,5
c label_diversity.n_pair_15_vs_7 label_diversity/results.csv --metric $UNSEEN --contrast n_pair=15,7
c label_diversity.unseen_mode_both_vs_one label_diversity/results.csv --metric $UNSEEN --contrast unseen_mode=both,one

# experiment 2: layout diversity (by n_pair), and n_pair 15 vs 5 at each n_layout
c layout_diversity.n_layout_20_vs_1  layout_diversity/results.csv --metric $UNSEEN --contrast n_layout=20,1
c layout_diversity.n_layout_40_vs_1  layout_diversity/results.csv --metric $UNSEEN --contrast n_layout=40,1
c layout_diversity.n_layout_40_vs_20 layout_diversity/results.csv --metric $UNSEEN --contrast n_layout=40,20
c layout_diversity.n_layout_20_vs_1.seen layout_diversity/results.csv --metric val_seen_pair.lr_acc --contrast n_layout=20,1
c layout_diversity.n_pair_15_vs_5    layout_diversity/results.csv --metric $UNSEEN --contrast n_pair=15,5

# experiment 3: caption modes: 2 vs 1 text layers (by caption_mode, n_pair), on training and
# unseen pairs; 1 layer against chance (one-sample, 0.5)
c caption_modes.text_layers_2_vs_1.train  caption_modes/results.csv --metric train.lr_acc --contrast text_layers=2,1
c caption_modes.text_layers_2_vs_1.unseen caption_modes/results.csv --metric $UNSEEN --contrast text_layers=2,1
c caption_modes.text_layers_2_vs_1.unseen_right caption_modes/results.csv --metric val_unseen_pair.lr_acc_right --contrast text_layers=2,1
c caption_modes.text_layers_1_vs_chance.train caption_modes/results.csv --metric train.lr_acc --contrast text_layers=1 --vs_chance 0.5
c caption_modes.text_layers_2_vs_chance.unseen caption_modes/results.csv --metric $UNSEEN --contrast text_layers=2 --vs_chance 0.5

# experiment 4: the search. lr 3e-3 vs 1e-3 (by n_pair, steps); init clip vs torch (by n_pair,
# embed_scale); n_pair 15 vs 5 under each init; torch init against chance
c search.lr_steps.lr_0.003_vs_0.001 search/lr_steps/results.csv --metric $UNSEEN --contrast lr=0.003,0.001
c search.lr_steps.n_pair_15_vs_5    search/lr_steps/results.csv --metric $UNSEEN --contrast n_pair=15,5
c search.init.clip_vs_torch         search/init/results.csv --metric $UNSEEN --contrast init=clip,torch
c search.init.clip_vs_torch.labelset search/init/results.csv --metric val_unseen_pair.labelset_acc --contrast init=clip,torch
c search.init.n_pair_15_vs_5        search/init/results.csv --metric $UNSEEN --contrast n_pair=15,5
c search.init.torch_vs_chance       search/init/results.csv --metric $UNSEEN --contrast init=torch --vs_chance 0.5
c search.clip_steps.steps_5000_vs_1500 search/clip_steps/results.csv --metric $UNSEEN --contrast steps=5000,1500

# experiment 5: the regime map and the sweeps against the same contrast (regime.sh; 10 seeds)
c regime.map.n_pair_15_vs_5         regime/map/results.csv --metric $UNSEEN --contrast n_pair=15,5
c regime.map.n_pair_5_vs_chance     regime/map/results.csv --metric $UNSEEN --contrast n_pair=5 --vs_chance 0.5
c regime.map.labelset.n_pair_15_vs_5 regime/map/results.csv --metric val_unseen_pair.labelset_acc --contrast n_pair=15,5
c regime.map.recognised.n_pair_15_vs_5 regime/map/results.csv --metric val_unseen_pair.lr_acc_recognised --contrast n_pair=15,5
c regime.budget.n_pair_15_vs_5      regime/budget/results.csv --metric $UNSEEN --contrast n_pair=15,5
c regime.budget.n_pair_5_vs_chance  regime/budget/results.csv --metric $UNSEEN --contrast n_pair=5 --vs_chance 0.5
c regime.budget.labelset.n_pair_15_vs_5 regime/budget/results.csv --metric val_unseen_pair.labelset_acc --contrast n_pair=15,5
c regime.budget.recognised.n_pair_5 regime/budget/results.csv --metric val_unseen_pair.lr_acc_recognised --contrast n_pair=5
c regime.sampler.n_pair_15_vs_5     regime/sampler/results.csv --metric $UNSEEN --contrast n_pair=15,5
c regime.sampler.uniform_vs_distinct regime/sampler/results.csv --metric $UNSEEN --contrast sampler=uniform,distinct
c regime.single_layouts.n_pair_15_vs_5 regime/single_layouts/results.csv --metric $UNSEEN --contrast n_pair=15,5
c regime.n_labels.10_vs_20          regime/n_labels/results.csv --metric $UNSEEN --contrast n_labels=10,20
c regime.unseen_mode.n_pair_15_vs_5 regime/unseen_mode/results.csv --metric $UNSEEN --contrast n_pair=15,5
c regime.budget_long.n_pair_15_vs_5 regime/budget_long/results.csv --metric $UNSEEN --contrast n_pair=15,5
c regime.budget_long.n_pair_5_vs_chance regime/budget_long/results.csv --metric $UNSEEN --contrast n_pair=5 --vs_chance 0.5

echo "wrote $(ls contrasts/*.md | wc -l) tables to $(pwd)/contrasts/"
