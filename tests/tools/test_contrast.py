"""tools/contrast.py: paired contrasts over seeds from a sweep's results.csv (statistics on known
numbers, the exact sign-flip p, ties, pairing by seed, the CLI's text and Markdown tables, and
one-line exit-2 refusals)."""

import csv
import itertools
import math

import numpy as np
import pytest

from minispatial.reporting import t975
from minispatial.tools import contrast

METRIC = "val_unseen_pair.lr_acc"


def test_paired_stats_known_numbers():
    a, b = [2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 2.0, 3.0, 4.0, 5.0]      # diffs 1..5
    s = contrast.paired_stats(a, b)
    half = t975(4) * math.sqrt(2.5) / math.sqrt(5)
    assert s["n"] == 5
    assert s["diff_mean"] == pytest.approx(3.0)
    assert s["diff_std"] == pytest.approx(math.sqrt(2.5))
    assert s["ci"] == pytest.approx(half)
    assert (s["ci_lo"], s["ci_hi"]) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert s["mean_a"] == pytest.approx(6.0) and s["std_a"] == pytest.approx(np.std(a, ddof=1))
    assert s["mean_b"] == pytest.approx(3.0) and s["std_b"] == pytest.approx(np.std(b, ddof=1))
    assert (s["n_pos"], s["n_neg"], s["n_tie"]) == (5, 0, 0)
    assert s["p"] == 2 / 32 and s["p_method"] == "exact"


def test_sign_flip_exact_values():
    assert contrast.sign_flip_p([1, 2, 3, 4, 5]) == 0.0625              # exactly 2/32
    assert contrast.sign_flip_p([-1, -2, -3, -4, -5]) == 0.0625
    assert contrast.sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert math.isnan(contrast.sign_flip_p([]))
    # against brute force over the 2^n assignments, with float sums that tie only up to rounding
    d = [0.1, -0.2, 0.3, 0.05, -0.15, 0.25, 0.1]
    obs = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= obs - 1e-12
               for signs in itertools.product((1, -1), repeat=len(d)))
    assert contrast.sign_flip_p(d) == hits / 2 ** len(d)


def test_sign_flip_monte_carlo_beyond_20_is_seeded():
    d = [1.0] * 25
    p = contrast.sign_flip_p(d)
    assert contrast.sign_flip_method(25) == "monte_carlo" and contrast.sign_flip_method(20) == "exact"
    assert p == contrast.sign_flip_p(d)                          # fixed seed: reproducible
    assert p == pytest.approx(1 / (1 + 2 ** 16), abs=3 / 2 ** 16)  # true p = 2^-24


def test_ties_counted():
    s = contrast.paired_stats([0.5, 0.7, 0.9, 0.6], [0.5, 0.8, 0.6, 0.6])
    assert (s["n_pos"], s["n_neg"], s["n_tie"]) == (1, 1, 2)
    with pytest.raises(ValueError):
        contrast.paired_stats([1.0, 2.0], [1.0])


def test_one_sample_against_chance():
    s = contrast.one_sample([0.9, 0.8, 0.85, 0.95, 0.9], chance=0.5)
    assert s["mean"] == pytest.approx(0.88) and s["vs_chance"] == "above" and s["excludes"]
    assert s["ci"] == pytest.approx(t975(4) * np.std([0.9, 0.8, 0.85, 0.95, 0.9], ddof=1) / math.sqrt(5))
    assert s["p"] == 0.0625
    near = contrast.one_sample([0.45, 0.55, 0.5, 0.52, 0.48], chance=0.5)
    assert near["vs_chance"] == "includes" and not near["excludes"]
    assert contrast.one_sample([0.1, 0.2, 0.15], chance=0.5)["vs_chance"] == "below"
    assert "vs_chance" not in contrast.one_sample([0.1, 0.2])


def test_unpaired_seeds_dropped():
    seeds, a, b, unpaired = contrast.pair_by_seed({"0": 0.9, "1": 0.8, "3": 0.7}, {"1": 0.6, "0": 0.5, "2": 0.4})
    assert (seeds, a, b, unpaired) == (["0", "1"], [0.9, 0.8], [0.5, 0.6], 2)


# --------------------------------------------------------------------------------------------
# the CLI on a small hand-made results.csv

def write_results(path, extra=()):
    # n_pair 15 vs 5 by mode; mode=x: 4 paired seeds (seed 4 failed at n_pair 5, seed 5 only at 15)
    cols = ["run", "status", "error", "n_pair", "mode", "seed", "wall_s", METRIC]
    rows = []
    vals = {("15", "x"): [0.9, 0.95, 0.9, 0.85, 0.9, 0.99], ("5", "x"): [0.7, 0.75, 0.9, 0.8, 0.1],
            ("15", "y"): [0.6, 0.6, 0.7], ("5", "y"): [0.5, 0.6, 0.5]}
    for (n_pair, mode), vs in vals.items():
        for seed, v in enumerate(vs):
            status = "failed" if (n_pair, mode, seed) == ("5", "x", 4) else "ok"
            rows.append({"run": f"{n_pair}{mode}{seed}", "status": status, "error": "",
                         "n_pair": n_pair, "mode": mode, "seed": seed, "wall_s": 1.0, METRIC: v})
    rows += list(extra)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def test_cli_text_table(tmp_path, capsys):
    path = write_results(tmp_path / "results.csv")
    assert contrast.main([str(path), "--metric", METRIC, "--contrast", "n_pair=15,5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"metric {METRIC}; contrast A−B with A = n_pair=15, B = n_pair=5; "
                             "paired by seed within each (mode)")
    assert "exact" in out[0]
    assert out[1].split() == ["mode", "n", "A:", "n_pair=15", "B:", "n_pair=5", "A−B", "95%", "CI", "of",
                              "A−B", "A>B/A<B/=", "p", "unpaired"]
    # mode x: seeds 0-3 pair (diffs .2 .2 0 .05), seed 4 failed at 5, seed 5 only at 15 -> 2 unpaired
    s = contrast.paired_stats([0.9, 0.95, 0.9, 0.85], [0.7, 0.75, 0.9, 0.8])
    x = out[3].split()
    assert x[:2] == ["x", "4"] and x[-3:] == ["3/0/1", contrast.fmt_p(s["p"]), "2"]
    assert x[8] == f"{s['diff_mean']:+.3f}" == "+0.112"
    assert " ".join(x[9:11]) == f"[{s['ci_lo']:+.3f}, {s['ci_hi']:+.3f}]"
    y = out[4].split()
    assert y[:2] == ["y", "3"] and y[-3:] == ["2/0/1", "0.5000", "0"]    # diffs .1 0 .2: 4/8 (0 takes both signs)
    assert len(out) == 5


def test_cli_markdown_and_one_sample(tmp_path, capsys):
    path = write_results(tmp_path / "results.csv")
    assert contrast.main([str(path), "--metric", METRIC, "--contrast", "n_pair=15,5", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"metric {METRIC}") and lines[1] == ""
    assert lines[2] == "| mode | n | A: n_pair=15 | B: n_pair=5 | A−B | 95% CI of A−B | A>B/A<B/= | p | unpaired |"
    assert lines[3] == "|---|---|---|---|---|---|---|---|---|"
    assert lines[5].startswith("| y | 3 | 0.633 ± 0.058 | 0.533 ± 0.058 | +0.100 |")
    assert lines[5].endswith("| 2/0/1 | 0.5000 | 0 |")
    assert contrast.main([str(path), "--metric", METRIC, "--contrast", "n_pair=15", "--vs_chance", "0.5",
                          "--by", "mode", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "vs 0.5" in lines[0]
    assert lines[2] == "| mode | n | mean ± std | 95% CI | vs 0.5 | p |"
    assert lines[4].startswith("| x | 6 | ") and lines[4].endswith("| above | 0.0312 |")   # 2/64


def test_cli_ambiguous_pairing_and_where(tmp_path, capsys):
    path = write_results(tmp_path / "results.csv")
    assert contrast.main([str(path), "--metric", METRIC, "--contrast", "n_pair=15,5", "--by", ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ambiguous pairing" in err and "mode" in err
    assert contrast.main([str(path), "--metric", METRIC, "--contrast", "n_pair=15,5", "--by", "",
                          "--where", "mode=y"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "rows with mode=y" in out[0] and out[3].split()[0] == "3"


@pytest.mark.parametrize("argv, message", [
    (["--metric", "val_unseen.lr_acc", "--contrast", "n_pair=15,5"], "is not a column"),
    (["--metric", METRIC, "--contrast", "n_pair=15,7"], "n_pair=7 is absent"),
    (["--metric", METRIC, "--contrast", "depth=1,2"], "is not a column"),
    (["--metric", METRIC, "--contrast", "n_pair"], "expected KEY=VALUE"),
    (["--metric", METRIC, "--contrast", "n_pair=15,5", "--vs_chance", "0.5"], "one-sample"),
    (["--metric", METRIC, "--contrast", "n_pair=15,5", "--by", "nope"], "not a column"),
    (["--contrast", "n_pair=15,5"], "--metric"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    path = write_results(tmp_path / "results.csv")
    with pytest.raises(SystemExit) if "--metric" not in argv else _nothing():
        code = contrast.main([str(path), *argv])
        assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_missing_file_is_exit_2(tmp_path, capsys):
    assert contrast.main([str(tmp_path / "none.csv"), "--metric", METRIC, "--contrast", "n_pair=1,2"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
