"""Does a run's text order preference follow the sign of its vision EP gradient?

For every run of the `minispatial analyze --out FILE.json` reports given: the EP slope of the
steepest vision head (layer 0, CLS row, logit per pixel) and the text tower's mean over heads of
EOT attention to the first-mentioned label minus to the second (left-form captions). Prints, per
file, how many runs have EP rising with a second-label preference or EP falling with a
first-label preference, and the pairs (seed, slope, preference).

    python order_vs_ep.py analysis/full/*.json
"""

import json
import sys


def runs(path):
    for r in json.load(open(path))["runs"]:
        slopes = [h["terms"]["EP"]["slope"] for h in r["vision"][0]["heads"]]
        eot = r["text"][0]["eot_attention"]["left"]
        pref = sum(h["att_first"] - h["att_second"] for h in eot) / len(eot)
        yield r["checkpoint"].split("seed=")[-1], max(slopes, key=abs), pref


for path in sys.argv[1:]:
    rr = list(runs(path))
    agree = sum((s > 0) == (p < 0) for _, s, p in rr)
    print(f"{path}: {agree}/{len(rr)} runs: EP rising with a second-label preference, or falling with a first-label one")
    print("   (seed, steepest EP slope, first - second attention):",
          ", ".join(f"({seed}, {s:+.2f}, {p:+.2f})" for seed, s, p in rr))
