"""Inside a trained dual encoder (docs/analysis.md, docs/paper.md §6): the attention-logit
decomposition, the horizontal attention gradient, head classes, the text EOT attention,
label-embedding alignment, and inference-time ablations of score terms; over several runs, their
mean ± std.

    minispatial analyze CHECKPOINT [CHECKPOINT ...] [--ablate EP,PP ...] [--heads 0,1,2,3]
                        [--tower vision|text|both] [--n_images N] [--step fast|reference]
                        [--json] [--out FILE] [--plots DIR]

One job per module, read in this order (each imports only the ones before it):

    decompose.py  the science: the residual parts E, P, R and the named score terms (EE, EP, ...)
    ablate.py     the science: removing terms before the softmax (hooks), ablated evaluation
    measure.py    probes and per-model measurements (CLS-row curves and slopes, head classes,
                  EOT attention, alignment) and `analyze`: the whole report of one model
    runs.py       mean ± std of those reports over several runs (seeds)
    report.py     the reports as text tables
    plots.py      the reports as figures (matplotlib, the `plot` extra)
    cli.py        `minispatial analyze`: arguments, output checks, checkpoints

Legend (shape comments): B batch, T tokens, D d_model, H heads (h: a selection of them),
Dh d_head, L image_len, n n_labels, Tq/Tk query/key positions.
"""
