#!/usr/bin/env bash
# Experiment 4: a search over the settings the paper does not state. Every sweep pins the
# searched settings explicitly (--key value), so it reproduces whatever the package defaults are.
# Each sweep: n_pair 5 (low label diversity) and 15 (high), seeds 0-4, 2 worker processes.
set -euo pipefail
cd "$(dirname "$0")"
BASE=(--n_layout 20 --batch_size 128 --lr 0.001 --steps 1500 --weight_decay 0
      --decay_embeddings false --init torch --embed_scale none --unseen_mode both)
pin() {  # BASE minus the keys given (those are swept)
  local out=() skip=" $* " i
  for ((i = 0; i < ${#BASE[@]}; i += 2)); do
    k=${BASE[i]#--}
    [[ $skip == *" $k "* ]] || out+=("${BASE[i]}" "${BASE[i+1]}")
  done
  printf '%s\n' "${out[@]}"
}
sweep() { local name=$1; shift; minispatial sweep --seeds 0-4 --workers 2 --quiet --out "search/$name" "$@"; }

mapfile -t P < <(pin weight_decay decay_embeddings)
sweep weight_decay --grid weight_decay=0,0.1,1 --grid n_pair=5,15 --grid decay_embeddings=false,true "${P[@]}"
mapfile -t P < <(pin lr steps)
sweep lr_steps --grid lr=0.0003,0.001,0.003 --grid n_pair=5,15 --grid steps=500,1500,5000 "${P[@]}"
mapfile -t P < <(pin init embed_scale)
sweep init --grid init=torch,clip --grid n_pair=5,15 --grid embed_scale=none,sqrt_d "${P[@]}"
mapfile -t P < <(pin batch_size)
sweep batch --grid batch_size=32,64,128,230 --grid n_pair=5,15 "${P[@]}"
mapfile -t P < <(pin unseen_mode)
sweep unseen_mode --grid n_pair=5,15 --grid unseen_mode=both,one "${P[@]}"

# Round 2: the first round showed the initialisation dominates (init=clip generalises, init=torch
# with its N(0,1) embeddings does not). With init=clip: learning rate, embedding scale and weight
# decay together, and training length.
CLIP=(--n_layout 20 --batch_size 128 --init clip --decay_embeddings false --unseen_mode both)
sweep clip_lr_scale_wd --grid lr=0.001,0.003 --grid n_pair=5,15 --grid embed_scale=none,sqrt_d \
  --grid weight_decay=0,0.1 --steps 1500 "${CLIP[@]}"
sweep clip_steps --grid steps=500,1500,5000 --grid n_pair=5,15 --lr 0.001 --embed_scale none \
  --weight_decay 0 "${CLIP[@]}"
