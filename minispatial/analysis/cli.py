"""`minispatial analyze CHECKPOINT [CHECKPOINT ...]`: the analysis of one checkpoint (a text
report, or its JSON), or of several (e.g. a shell glob SWEEP/runs/*: each analysed, then the mean
± std over them; the JSON is then {"runs": [one report each], "aggregate": {...}}).

Every output path (--out, --plots) and matplotlib (for --plots) are checked, and every checkpoint
loaded, before the (slow) analysis starts. --step names the encoders of the un-ablated evaluation
(step.choose: "fast", the default, is what training reports; "reference" the NumPy model);
ablations always run the hooked reference forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from minispatial import step as steps
from minispatial.analysis import measure
from minispatial.analysis.ablate import DEFAULT_ABLATIONS
from minispatial.analysis.decompose import ALL_TERMS
from minispatial.analysis.figures import save_paper_figures
from minispatial.analysis.plots import save_aggregate_plots, save_plots
from minispatial.analysis.report import format_aggregate, format_report
from minispatial.analysis.runs import aggregate_reports, check_same_shape
from minispatial.checkpoint import CHECKPOINT, load_checkpoint
from minispatial.cli import check_output_dir, check_output_file
from minispatial.reporting import pyplot


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minispatial analyze",
                                description="Attention-logit decomposition (EE, EP, PE, PP, BE, BP, ...), "
                                            "horizontal gradient, head classes, text EOT attention, "
                                            "alignment and inference-time ablations of a checkpoint; "
                                            "with several checkpoints, also mean ± std over them.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="a checkpoint.npz, or a run directory holding one; several (e.g. a shell glob "
                        "SWEEP/runs/*) are each analysed and then aggregated")
    p.add_argument("--ablate", action="append", default=None, metavar="TERMS",
                   help="a set of terms to remove, comma-separated, e.g. EP or EP,VP (repeatable; "
                        f"terms {', '.join(ALL_TERMS)}; VP = value-path position part; POS = every term "
                        "with P). Default: baseline, EP, PE, PP, BP, EP+VP")
    p.add_argument("--heads", default=None, help="heads the ablations apply to, e.g. 0,1 (default all)")
    p.add_argument("--tower", default="vision", choices=["vision", "text", "both"],
                   help="tower the ablations apply to (default vision)")
    p.add_argument("--n_images", "--n-images", dest="n_images", type=int, default=512,
                   help="two-object images for the CLS-row statistics (default 512)")
    p.add_argument("--step", default="fast", choices=steps.STEPS,
                   help="encoders of the un-ablated evaluation and the alignment features: fast "
                        "(default; what training reports) or reference (the NumPy model)")
    p.add_argument("--json", action="store_true",
                   help="print the whole result as JSON (several checkpoints: "
                        "{\"runs\": [one report each], \"aggregate\": {...}})")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write that JSON to FILE")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="save PNGs in DIR (needs matplotlib): heat maps and CLS-row curves of one "
                        "checkpoint, or of several the ablation table over runs; and the paper's "
                        "figures (analysis/figures.py: term heat maps, sign-aligned EP curves, "
                        "attention examples)")
    return p


def load_checkpoints(paths: list[str]) -> list[tuple]:
    """load_checkpoint of every path, before any (slow) analysis starts. ValueError on a bad
    checkpoint, on one given twice (it would count twice in the mean) or on different shapes."""
    seen: dict[Path, str] = {}
    for p in paths:
        f = (Path(p) / CHECKPOINT if Path(p).is_dir() else Path(p)).resolve()
        if f in seen:
            raise ValueError(f"checkpoint {f} is given twice (as {seen[f]} and {p})")
        seen[f] = p
    loaded = [load_checkpoint(p) for p in paths]
    check_same_shape([dataclasses.asdict(run_cfg.model) for run_cfg, *_ in loaded], list(paths))
    return loaded


def main(argv: list[str] | None = None) -> int:
    """`minispatial analyze CHECKPOINT [CHECKPOINT ...]` -> 0, or 2 on a bad checkpoint or option."""
    args = build_parser().parse_args(argv)
    try:
        heads = None if args.heads is None else [int(h) for h in args.heads.split(",") if h.strip()]
        if args.n_images < 1:
            raise ValueError(f"--n_images={args.n_images} is invalid: must be >= 1")
        ablations = DEFAULT_ABLATIONS if args.ablate is None else args.ablate
        # every output path is checked before the (slow) analysis; created only to write into
        if args.out:
            check_output_file(args.out, "--out")
        if args.plots:
            check_output_dir(args.plots, "--plots")
            pyplot()                                  # ImportError naming the `plot` extra
        loaded = load_checkpoints(args.checkpoints)
        encoders = steps.choose(args.step).encoders
        reports = []
        for i, (path, (run_cfg, params, _, step)) in enumerate(zip(args.checkpoints, loaded)):
            if len(loaded) > 1:
                print(f"analysing {i + 1}/{len(loaded)}: {path}", file=sys.stderr)
            reports.append({"checkpoint": str(path), "step": step,
                            **measure.analyze(params, run_cfg, ablations, heads, args.tower, args.n_images,
                                              encoders=encoders)})
        agg = aggregate_reports(reports) if len(reports) > 1 else None
        doc = reports[0] if agg is None else {"runs": reports, "aggregate": agg}
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        written = []
        if args.plots:
            written = save_plots(doc, args.plots) if agg is None else save_aggregate_plots(agg, args.plots)
            written += [str(f) for f in save_paper_figures(
                [(run_cfg, params, rep) for (run_cfg, params, *_), rep in zip(loaded, reports)], args.plots)]
    except (ValueError, OSError, ImportError) as e:
        print(f"minispatial analyze: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(format_report(doc) if agg is None else format_aggregate(agg))
        for w in written + ([args.out] if args.out else []):
            print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
