"""Seed sweeps: the summary's statistics, reuse of finished seeds, and the comparison table."""
import json

import pytest

from polyalign.cli import main
from polyalign.errors import PolyalignError
from polyalign.app.sweep import compare_table, run_sweep, summarise


def test_summarise_mean_and_sample_std():
    s = summarise({0: {"a": 1.0, "b": 2.0}, 1: {"a": 3.0}, 2: {"a": 5.0}})
    assert s["a"]["mean"] == 3.0 and s["a"]["std"] == 2.0 and s["a"]["values"] == [1.0, 3.0, 5.0]
    assert s["b"] == {"mean": 2.0, "std": 0.0, "n": 1, "values": [2.0]}


def test_sweep_trains_each_seed_reuses_finished_ones_and_tabulates(tmp_path, tiny_overrides, capsys):
    overrides = tiny_overrides + ["train.max_steps=4", "data.train_size=64", "eval.n_examples=0"]
    summary = run_sweep(None, [0, 1], tmp_path / "sw", overrides, show_progress=False)
    runs = [json.loads((tmp_path / "sw" / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 1)]
    key = "retrieval/t2i_R@1"
    assert summary["metrics"][key]["values"] == [runs[0][key], runs[1][key]]
    assert runs[0]["train/steps"] == 4 and set(summary["wall_s_this_invocation"]) == {0, 1}
    assert "--seeds 0,1" in summary["command"]
    again = run_sweep(None, [0, 1], tmp_path / "sw", overrides, show_progress=False)
    assert again["wall_s_this_invocation"] == {} and again["metrics"] == summary["metrics"]
    table = compare_table([tmp_path / "sw"], [key, "no/such_metric"], ["tiny"])
    mean, std = summary["metrics"][key]["mean"], summary["metrics"][key]["std"]
    assert f"| tiny | 2 | {mean:.3f} ± {std:.3f} | – |" in table
    assert main(["table", str(tmp_path / "sw"), "--metrics", key]) == 0
    assert "| sw | 2 |" in capsys.readouterr().out


def test_table_of_a_folder_without_summary_is_a_clear_error(tmp_path):
    with pytest.raises(PolyalignError, match="no sweep summary"):
        compare_table([tmp_path], ["x"])
    assert main(["sweep", "nowhere.yaml", "--seeds", "0"]) == 2


T_975_2 = 4.302652729911275  # Student t, 97.5th percentile, 2 degrees of freedom


def fake_sweep(root, per_seed: dict[int, dict[str, float]]):
    """A sweep directory as `polyalign sweep` leaves it: seed-<s>/metrics.json and summary.json."""
    root.mkdir()
    for seed, metrics in per_seed.items():
        (root / f"seed-{seed}").mkdir()
        (root / f"seed-{seed}" / "metrics.json").write_text(json.dumps(metrics))
    (root / "summary.json").write_text(json.dumps({"seeds": list(per_seed), "command": "polyalign sweep x",
                                                   "metrics": summarise(per_seed)}))
    return root


def test_table_pairs_seeds_against_the_baseline(tmp_path, capsys):
    a = fake_sweep(tmp_path / "A", {0: {"m": 0.50, "n": 0.1}, 1: {"m": 0.60, "n": 0.2}, 2: {"m": 0.55, "n": 0.3}})
    b = fake_sweep(tmp_path / "B", {0: {"m": 0.55, "n": 0.20}, 1: {"m": 0.68, "n": 0.31}, 2: {"m": 0.58, "n": 0.39},
                                    3: {"m": 0.90, "n": 0.9}})
    table = compare_table([a, b], ["m", "n"])
    # m: differences 0.05, 0.08, 0.03 (seed 3 has no partner): mean 0.0533, sd 0.02517
    half = T_975_2 * 0.025166114784235824 / 3 ** 0.5
    assert f"+0.053 [{0.05333333 - half:+.3f}, {0.05333333 + half:+.3f}]" == "+0.053 [-0.009, +0.116]"
    # n: differences 0.10, 0.11, 0.09: mean 0.10, sd 0.01, interval [0.075, 0.125] excludes 0
    assert f"{0.1 - T_975_2 * 0.01 / 3 ** 0.5:.3f}" == "0.075"
    assert "| run | seeds | m | Δ m vs A | n | Δ n vs A |" in table
    assert "| A | 3 | 0.550 ± 0.050 | baseline | 0.200 ± 0.100 | baseline |" in table
    assert "| B | 4 | 0.677 ± 0.158 | +0.053 [-0.009, +0.116] | 0.450 ± 0.310 | +0.100 [+0.075, +0.125] * |" in table
    assert "seed(s) 3 only in B, dropped" in table
    assert main(["table", str(a), str(b), "--metrics", "n", "--baseline", "B"]) == 0
    out = capsys.readouterr().out
    assert "| A | 3 | 0.200 ± 0.100 | -0.100 [-0.125, -0.075] * |" in out and "| B | 4 | 0.450 ± 0.310 | baseline |" in out
    with pytest.raises(PolyalignError, match="--baseline C: not one of the sweeps"):
        compare_table([a, b], ["m"], baseline="C")


def test_table_pairing_reads_seed_files_when_a_seed_lacks_a_metric(tmp_path):
    a = fake_sweep(tmp_path / "A", {0: {"m": 1.0}, 1: {"m": 2.0}, 2: {"m": 4.0}})
    b = fake_sweep(tmp_path / "B", {0: {"m": 1.5}, 1: {}, 2: {"m": 4.5}})  # summary values [1.5, 4.5]: seeds 0, 2
    table = compare_table([a, b], ["m"], digits=2)
    assert "| B | 3 | 3.00 ± 2.12 | +0.50 [+0.50, +0.50] * |" in table  # not paired as seeds 0, 1 (+0.5, +2.5)
    assert "m missing (or NaN) in seed(s) 1" in table
    one = fake_sweep(tmp_path / "C", {2: {"m": 5.0}})
    assert "| C | 1 | 5.00 | +1.00 (1 seed) |" in compare_table([a, one], ["m"], digits=2)


def test_table_without_shared_seeds_is_a_clear_error(tmp_path, capsys):
    a = fake_sweep(tmp_path / "A", {0: {"m": 1.0}, 1: {"m": 2.0}})
    b = fake_sweep(tmp_path / "B", {5: {"m": 1.0}, 6: {"m": 2.0}})
    with pytest.raises(PolyalignError, match=r"cannot pair B with the baseline A: no seed in common \(B: 5, 6; A: 0, 1\)"):
        compare_table([a, b], ["m"])
    assert main(["table", str(a), str(b), "--metrics", "m"]) == 1
    assert "polyalign table: error: cannot pair B with the baseline A" in capsys.readouterr().err
