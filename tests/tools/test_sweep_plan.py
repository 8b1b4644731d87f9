"""The sweep's plan: parsing the grid, seeds and fixed settings, and planning the runs
(minispatial/tools/sweep/plan.py)."""

import pytest

from minispatial.tools.sweep import plan


@pytest.mark.parametrize("text, want", [("0-4", [0, 1, 2, 3, 4]), ("0,2,5", [0, 2, 5]),
                                        ("3", [3]), ("0-2,7", [0, 1, 2, 7]), (" 1 , 4 ", [1, 4])])
def test_parse_seeds(text, want):
    assert plan.parse_seeds(text) == want


@pytest.mark.parametrize("text", ["", "a", "4-2", "1,1", "-1", "0-", "1.5", "0-2,2"])
def test_parse_seeds_rejects(text):
    with pytest.raises(ValueError, match="--seeds"):
        plan.parse_seeds(text)


def test_parse_grid_and_sets():
    assert plan.parse_grid(["n_pair=5,10,15", "lr=1e-3"]) == {"n_pair": ["5", "10", "15"], "lr": ["1e-3"]}
    assert plan.parse_grid(["n-pair=5"]) == {"n_pair": ["5"]}          # dashes as in --n-pair
    assert plan.parse_grid(["data.n_layout=5,20"]) == {"data.n_layout": ["5", "20"]}
    assert plan.parse_sets(["steps=5", "caption_mode=left+right"]) == {"steps": "5", "caption_mode": "left+right"}
    for bad, msg in [("n_pair", "KEY=V1"), ("n_pair=", "empty"), ("n_pair=5,,6", "empty"),
                     ("n_pair=5,5", "repeats"), ("bogus=1,2", "unknown config field 'bogus'")]:
        with pytest.raises(ValueError, match=msg):
            plan.parse_grid([bad])
    with pytest.raises(ValueError, match="twice"):
        plan.parse_grid(["n_pair=5", "n_pair=6"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        plan.parse_sets(["steps"])


def test_overlapping_settings_are_rejected():
    plan.check_no_overlap({"n_pair": ["5"]}, {"steps": "5"})
    with pytest.raises(ValueError, match="data.n_pair"):
        plan.check_no_overlap({"n_pair": ["5"]}, {"data.n_pair": "6"})
    with pytest.raises(ValueError, match="--seeds"):
        plan.check_no_overlap({}, {"train.seed": "1"})


def test_plan_runs_order_names_and_overrides():
    runs = plan.plan_runs({"n_pair": ["5", "10"], "lr": ["1e-3", "3e-4"]}, [0, 1], {"steps": "7"})
    assert [r.name for r in runs[:3]] == ["n_pair=5__lr=1e-3__seed=0", "n_pair=5__lr=1e-3__seed=1",
                                          "n_pair=5__lr=3e-4__seed=0"]
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert runs[-1].overrides == {"steps": "7", "n_pair": "10", "lr": "3e-4", "seed": "1"}
    assert plan.run_name({"caption_mode": "left+right"}, 2) == "caption_mode=left+right__seed=2"
    assert plan.run_name({"x": "a/b c"}, 0) == "x=a_b_c__seed=0"
    assert plan.plan_runs({}, [3], {})[0].name == "seed=3"


def test_fixed_settings_in_either_spelling_keep_their_order():
    items = [("--lr", "0.003"), ("--set", "steps=3"), ("--n-layout", "4"), ("--data.seed", " 2 ")]
    assert list(plan.fixed_settings(items).items()) == [("lr", "0.003"), ("steps", "3"),
                                                         ("n_layout", "4"), ("data.seed", "2")]
    assert plan.parse_sets(["steps=5"]) == plan.fixed_settings([("--steps", "5")])
    for items, msg in [([("--set", "steps=3"), ("--steps", "4")], "steps is given twice"),
                       ([("--steps", "3"), ("--steps=", "4")], "unknown option or config field"),
                       ([("--bogus", "1")], "unknown option or config field --bogus"),
                       ([("--lr", None)], "--lr needs a value"), ([("--lr", " ")], "empty value"),
                       ([("--set", "lr")], "KEY=VALUE")]:
        with pytest.raises(ValueError, match=msg):
            plan.fixed_settings(items)
    with pytest.raises(ValueError, match="--seeds and --seed both set data.seed"):
        plan.check_no_overlap({}, plan.fixed_settings([("--seed", "3")]))
