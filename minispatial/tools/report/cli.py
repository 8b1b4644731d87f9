"""`minispatial report RUN [RUN ...] --out report.html`: one self-contained HTML page of one or
more run directories (config, training curves, metric table, analysis figures, ablation table;
several runs: mean ± 95% CI over runs, curves overlaid, the aggregate figures).

Before the (slow) analysis: --out is checked (cli.check_output_file), matplotlib is imported (the
`plot` extra), every RUN must hold checkpoint.npz and summary.json, and every checkpoint is loaded
(analysis/cli.py's `load_checkpoints`: validated, none twice, one model shape). Each checkpoint is
then analysed as `minispatial analyze` does with its default ablations (--step names the encoders
of the un-ablated evaluation). The page is written to a temporary file and renamed into place.
Exit codes: 0 done, 2 bad arguments or input (one line, naming the path), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from minispatial import step as steps
from minispatial.analysis import measure
from minispatial.analysis.ablate import DEFAULT_ABLATIONS
from minispatial.analysis.cli import load_checkpoints
from minispatial.analysis.runs import aggregate_reports
from minispatial.checkpoint import CHECKPOINT
from minispatial.cli import check_output_file
from minispatial.config import to_dict
from minispatial.reporting import pyplot
from minispatial.tools.report import html, sections
from minispatial.tools.report.sections import Run

SUMMARY, CONFIG, METRICS_LOG = "summary.json", "config.json", "metrics.jsonl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minispatial report",
                                description="One self-contained HTML page (embedded PNG figures, inline "
                                            "CSS, no script, no network reference) of one or more runs: "
                                            "config, training curves, metric table, analysis figures and "
                                            "ablation table; several runs: mean ± 95% CI over runs.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a run directory (checkpoint.npz, summary.json, config.json, metrics.jsonl); "
                        "several (e.g. a shell glob SWEEP/runs/*) are reported together")
    p.add_argument("--out", required=True, metavar="FILE", help="the HTML file to write")
    p.add_argument("--step", default="fast", choices=steps.STEPS,
                   help="encoders of the analysis' un-ablated evaluation and alignment features: fast "
                        "(default; what training reports) or reference (the NumPy model)")
    p.add_argument("--n_images", "--n-images", dest="n_images", type=int, default=512,
                   help="two-object images for the analysis' CLS-row statistics (default 512)")
    return p


def run_dir(path: str) -> Path:
    """RUN (a run directory, or its checkpoint.npz) -> the directory; ValueError naming the path
    unless it holds checkpoint.npz and summary.json."""
    p = Path(path)
    d = p.parent if p.is_file() and p.name == CHECKPOINT else p
    if not d.is_dir():
        raise ValueError(f"RUN {path} is not a run directory" + ("" if d.exists() else " (it does not exist)"))
    for name in (CHECKPOINT, SUMMARY):
        if not (d / name).is_file():
            raise ValueError(f"RUN {path} has no {name} (not a finished run): {d / name}")
    return d


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a JSON object")
    return obj


def read_log(path: Path) -> list[dict]:
    """The records of metrics.jsonl ([] without the file). A torn last line (no newline: what a
    crash leaves) and blank lines are skipped; any other unreadable line is a ValueError naming the
    file and the line."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    lines.pop()                                  # "" after the last newline, or a torn last line
    out = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except ValueError as e:
            raise ValueError(f"{path} line {i}: not JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise ValueError(f"{path} line {i}: not a record with an integer step")
        out.append(rec)
    return out


def load_runs(paths: list[str]) -> list[Run]:
    """Every RUN checked and loaded (nothing analysed yet)."""
    dirs = [run_dir(p) for p in paths]
    loaded = load_checkpoints([str(d) for d in dirs])
    runs = []
    for d, label, (run_cfg, params, _, step) in zip(dirs, sections.run_labels(dirs), loaded):
        config = read_json(d / CONFIG) if (d / CONFIG).is_file() else to_dict(run_cfg)
        runs.append(Run(path=d, config=config, run_cfg=run_cfg, params=params, step=step,
                        summary=read_json(d / SUMMARY), log=read_log(d / METRICS_LOG), label=label))
    return runs


def build_page(runs: list[Run], agg: dict | None, step: str, n_images: int) -> str:
    """The whole HTML document of analysed runs (agg: aggregate_reports of several, else None)."""
    title = (f"minispatial report: {runs[0].label}" if len(runs) == 1 else
             f"minispatial report: {len(runs)} runs")
    body = [sections.runs_section(runs), sections.metrics_section(runs), sections.curves_section(runs),
            sections.ablation_section(runs, agg), sections.figures_section(runs, agg),
            sections.config_section(runs),
            html.note(f"Written by minispatial report (--step {step}, --n_images {n_images}; ablations "
                      f"{', '.join(a or 'baseline' for a in DEFAULT_ABLATIONS)}). Self-contained: figures "
                      "are embedded, no script, no external resource.")]
    return html.page(title, body)


def write_file(path: Path, text: str) -> None:
    # a temporary file in the same directory, then renamed over `path`: never half written
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """`minispatial report RUN [RUN ...] --out FILE` -> 0; 2 on a bad RUN, --out, option or a
    missing matplotlib; 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    try:
        if args.n_images < 1:
            raise ValueError(f"--n_images={args.n_images} is invalid: must be >= 1")
        check_output_file(args.out, "--out")
        pyplot()                                           # ImportError naming the `plot` extra
        runs = load_runs(args.runs)
        encoders = steps.choose(args.step).encoders
        for i, r in enumerate(runs):
            print(f"analysing {i + 1}/{len(runs)}: {r.path}", file=sys.stderr)
            r.report = {"checkpoint": str(r.path), "step": r.step,
                        **measure.analyze(r.params, r.run_cfg, DEFAULT_ABLATIONS, None, "vision",
                                          args.n_images, encoders=encoders)}
        agg = aggregate_reports([r.report for r in runs]) if len(runs) > 1 else None
        text = build_page(runs, agg, args.step, args.n_images)
        write_file(Path(args.out), text)
    except (ValueError, OSError, ImportError) as e:
        print(f"minispatial report: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nminispatial report: interrupted; nothing written", file=sys.stderr)
        return 130
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out} ({size / 1024:.0f} KB, {len(runs)} run{'s' if len(runs) > 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
