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
