"""tools/report: `minispatial report RUN [RUN ...] --out FILE`, one self-contained HTML page of
tiny trained runs: valid HTML, embedded PNGs only, no script or URL, the metric table equal to
summary.json, mean ± CI over two runs, refusals (exit 2, one line) before the work."""

import base64
import importlib.util
import json
import math
import struct
import sys
import types
import zlib
from html.parser import HTMLParser

import pytest

from minispatial import cli
from minispatial.analysis import measure
from minispatial.tools.report import html, sections, stats
from minispatial.tools.report import cli as report_cli

pytest.importorskip("matplotlib")

# a small testbed (tests/support.py's SMALL) keeps the analysis of a run near a second
# and few heads make few subplots (matplotlib is most of a report's time)
SMALL = ["--n_pair", "4", "--n_labels", "8", "--n_heldout", "3", "--image_len", "6", "--n_layout", "10",
         "--n_heads", "2"]
ANALYZE = measure.analyze
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr"}
SPLITS = ("train", "val_single", "val_seen_pair", "val_unseen_pair")


class Page(HTMLParser):
    """Parses a document: checks tags are balanced, counts them, collects <img src> and the text
    of the cells of every table with an id."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.stack, self.counts, self.srcs, self.errors = [], {}, [], []
        self.tables, self._table, self._row, self._cell = {}, None, None, None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        if tag == "table" and a.get("id"):
            self._table = self.tables.setdefault(a["id"], [])
        if tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        if tag in ("td", "th") and self._row is not None:
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self._table = self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def train(out, seed):
    assert cli.main(["train", "--preset", "tiny", "--steps", "40", "--seed", str(seed), *SMALL,
                     "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def rep_runs(tmp_path_factory):
    """Two tiny trained runs (seeds 0, 1) and their reports: -> (tmp dir, run dirs, {name: HTML})."""
    tmp = tmp_path_factory.mktemp("report")
    runs = [tmp / "runs" / f"seed{s}" for s in (0, 1)]
    for s, r in enumerate(runs):
        train(r, s)
    pages = {}
    for name, rs in (("one", runs[:1]), ("two", runs)):
        out = tmp / "out" / f"{name}.html"                 # the directory is created
        with pytest.MonkeyPatch.context() as mp:
            if name == "one":     # analysis/figures.py's own figures: once (two runs), for time
                mp.setattr(sections, "paper_figures", lambda runs, out_dir: [])
            assert report_cli.main([*map(str, rs), "--out", str(out), "--n_images", "32"]) == 0
        pages[name] = out.read_text(encoding="utf-8")
    return tmp, runs, pages


def png_ok(data: bytes) -> bool:
    # the PNG signature, then whole chunks with right CRCs, ending with IEND
    if not data.startswith(html.PNG_SIGNATURE):
        return False
    i, kind = len(html.PNG_SIGNATURE), None
    while i + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        crc = struct.unpack(">I", data[i + 8 + length:i + 12 + length])[0]
        if crc != zlib.crc32(kind + data[i + 8:i + 8 + length]):
            return False
        i += 12 + length
    return i == len(data) and kind == b"IEND"


@pytest.mark.parametrize("name", ["one", "two"])
def test_report_is_valid_self_contained_html(rep_runs, name):
    text = rep_runs[2][name]
    page = Page(text)
    assert page.errors == [] and page.stack == []
    assert text.startswith("<!DOCTYPE html>")
    assert page.counts["html"] == page.counts["head"] == page.counts["body"] == 1
    assert page.counts.get("script", 0) == 0 and "<script" not in text.lower()
    assert "http://" not in text and "https://" not in text
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert len(page.srcs) >= 3                      # curves + the analysis figures
    for src in page.srcs:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        png = base64.b64decode(src[len(prefix):], validate=True)
        assert png_ok(png)
        assert b"tEXt" not in png and b"matplotlib.org" not in png      # metadata stripped


def test_one_run_metric_table_equals_summary(rep_runs):
    tmp, runs, pages = rep_runs
    summary = json.loads((runs[0] / "summary.json").read_text())
    table = Page(pages["one"]).tables["metrics"]
    header, rows = table[0], table[1:]
    assert header == ["metric", *SPLITS]
    checked = 0
    for metric, *cells in rows:
        for split, cell in zip(SPLITS, cells):
            v = summary.get(f"{split}.{metric}")
            if v is None:
                assert cell == "-"
            else:
                assert cell == (str(int(v)) if metric == "n" else f"{v:.3f}"), (metric, split)
                checked += 1
    assert checked >= 30 and {r[0] for r in rows} >= {"lr_acc", "i2t_acc", "loss"}
    other = dict(Page(pages["one"]).tables["summary-other"][1:])
    assert other["logit_scale"] == f"{summary['logit_scale']:.3f}" and other["step"] == "40"
    abl = Page(pages["one"]).tables["ablations"]
    assert [r[0] for r in abl[1:]] == ["baseline", "-EP", "-PE", "-PP", "-BP", "-EP-VP"]
    assert abl[0][3] == "unseen.lr_acc"
    assert abl[1][3] == f"{summary['val_unseen_pair.lr_acc']:.3f}"   # baseline = training's eval
    assert Page(pages["one"]).tables["config-train"][1:][-1] == ["weight_decay", "0.0"]


def test_two_runs_mean_and_ci(rep_runs):
    tmp, runs, pages = rep_runs
    page = Page(pages["two"])
    sums = [json.loads((r / "summary.json").read_text()) for r in runs]
    header, *rows = page.tables["metrics"]
    assert header == ["metric", *SPLITS]
    cells = {r[0]: dict(zip(SPLITS, r[1:])) for r in rows}
    vals = [s["val_seen_pair.pos_cos"] for s in sums]
    mean = sum(vals) / 2
    ci = 12.7062 * math.sqrt(sum((v - mean) ** 2 for v in vals)) / math.sqrt(2)   # t(0.975, 1) s/√2
    assert cells["pos_cos"]["val_seen_pair"] == f"{mean:.3f} ± {ci:.3f}"
    assert "±" in page.tables["ablations"][1][3] or page.tables["ablations"][1][3].count(".") == 1
    assert [r[0] for r in page.tables["runs"][1:]] == ["seed0", "seed1"]
    seeds = dict(page.tables["config-train"][1:])["seed"]
    assert seeds == "0 / 1"                                   # differing config values, in run order
    assert cells["n"] == {s: str(int(sums[0][f"{s}.n"])) for s in SPLITS}      # equal counts: once
    assert dict(page.tables["config-model"][1:])["layernorm"] == "false"           # as config.json
    if importlib.util.find_spec("minispatial.analysis.figures"):       # analysis/figures.py's figures
        assert "Paper figures" in pages["two"]
    assert "curves" in pages["two"] and "Mean ± 95% confidence interval over 2 runs" in pages["two"]


def test_t_interval_table():
    assert stats.t975(1) == 12.7062 and stats.t975(4) == 2.7764 and stats.t975(30) == 2.0423
    assert stats.t975(45) == 2.0211 and stats.t975(10 ** 6) == 1.96
    s = stats.mean_ci([1.0, 2.0, 3.0, None])                  # None: undefined, left out
    assert s["n"] == 3 and s["mean"] == 2.0 and s["ci"] == pytest.approx(4.3027 / math.sqrt(3))
    assert stats.fmt_ci(stats.mean_ci([0.5])) == "0.500" and stats.fmt_ci(stats.mean_ci([None])) == "-"


def test_paper_figures_are_embedded_when_available(rep_runs, monkeypatch, tmp_path):
    # whatever analysis/figures.py provides is embedded; here a stand-in that writes one PNG
    _, runs, _ = rep_runs
    import matplotlib.pyplot as plt

    def save_paper_figures(rs, out_dir):
        assert len(rs) == 1 and set(rs[0][2]) >= {"vision", "ablations"}
        out_dir.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots()
        ax.set_title("stand-in")
        fig.savefig(out_dir / "stand_in_paper_figure.png")
        plt.close(fig)
        return [out_dir / "stand_in_paper_figure.png"]

    monkeypatch.setitem(sys.modules, "minispatial.analysis.figures",
                        types.SimpleNamespace(save_paper_figures=save_paper_figures))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    monkeypatch.setattr(measure, "analyze", lambda *a, **k: {**cached_report(runs[0])})
    out = tmp_path / "r.html"
    assert report_cli.main([str(runs[0]), "--out", str(out)]) == 0
    text = out.read_text()
    assert "stand in paper figure" in text and "Paper figures" in text


def cached_report(run):
    # a real analysis of the run, computed once per test session
    if run not in _REPORTS:
        from minispatial.analysis.cli import load_checkpoints
        run_cfg, params, *_ = load_checkpoints([str(run)])[0]
        _REPORTS[run] = ANALYZE(params, run_cfg, n_images=8)
    return _REPORTS[run]


_REPORTS = {}


def test_refusals_before_the_work(rep_runs, capsys, monkeypatch):
    tmp, runs, _ = rep_runs
    monkeypatch.setattr(measure, "analyze", lambda *a, **k: pytest.fail("the analysis ran"))
    (tmp / "no_summary").mkdir(exist_ok=True)
    (tmp / "no_summary" / "checkpoint.npz").write_bytes((runs[0] / "checkpoint.npz").read_bytes())
    (tmp / "a_file").write_text("x")
    cases = [
        ([str(tmp / "missing"), "--out", str(tmp / "x.html")], str(tmp / "missing")),
        ([str(runs[0]), str(tmp / "no_summary"), "--out", str(tmp / "x.html")], "summary.json"),
        ([str(runs[0]), str(runs[0]), "--out", str(tmp / "x.html")], "given twice"),
        ([str(runs[0]), "--out", str(tmp)], "--out"),                          # a directory
        ([str(runs[0]), "--out", str(tmp / "a_file" / "x.html")], "--out"),    # under a file
        ([str(runs[0]), "--out", str(tmp / "x.html"), "--n_images", "0"], "--n_images"),
    ]
    for argv, named in cases:
        assert report_cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("minispatial report: error: ") and named in err, err
        assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp / "x.html").exists()
    # through the console dispatcher too, and a RUN given as its checkpoint file works as the dir
    assert cli.main(["report", str(tmp / "missing"), "--out", str(tmp / "x.html")]) == 2
    assert "minispatial report: error:" in capsys.readouterr().err
    assert report_cli.run_dir(str(runs[0] / "checkpoint.npz")) == runs[0]


def test_without_matplotlib_one_line_exit_2(rep_runs, capsys, monkeypatch, tmp_path):
    _, runs, _ = rep_runs

    def no_matplotlib():
        raise ImportError("matplotlib is not installed (pip install 'minispatial[plot]')")

    monkeypatch.setattr(report_cli, "pyplot", no_matplotlib)
    monkeypatch.setattr(measure, "analyze", lambda *a, **k: pytest.fail("the analysis ran"))
    assert report_cli.main([str(runs[0]), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err == "minispatial report: error: matplotlib is not installed (pip install 'minispatial[plot]')\n"
    assert not (tmp_path / "r.html").exists()


def test_strip_png_text_and_bad_input():
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data))
    png = html.PNG_SIGNATURE + chunk(b"IHDR", b"\0" * 13) + chunk(b"tEXt", b"Software\0x") + chunk(b"IEND", b"")
    assert html.strip_png_text(png) == html.PNG_SIGNATURE + chunk(b"IHDR", b"\0" * 13) + chunk(b"IEND", b"")
    with pytest.raises(ValueError):
        html.img(b"GIF89a", "x")
    assert html.esc('<a href="x">') == "&lt;a href=&quot;x&quot;&gt;"
