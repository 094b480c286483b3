"""The fusion model inside the toolkit: recipe errors, a training run through the normal loop with ITM re-ranking,
and `polyalign inspect gradcam` (the model's own units are in test_albef.py)."""
import json

import pytest

from polyalign.cli import main
from polyalign.config import load_config
from polyalign.errors import ConfigError
from polyalign.app.training import train


FUSION_RUN = ["loss.weights.clip=0", "loss.weights.itc=1", "loss.weights.itm=1", "loss.weights.mlm=1",
              "model.image.kind=vit", "model.fusion.queue_size=64", "model.fusion.embed_dim=16", "eval.n_examples=0",
              "train.max_steps=3", "train.checkpoint_every=3", "eval.rerank_k=10"]


@pytest.mark.parametrize("extra,match", [
    (["loss.weights.clip=1"], r"loss terms itc.*clip belong to the dual encoder"),
    (["loss.weights.fdt=1"], r"fdt belong to the dual encoder"),
    (["train.grad_cache_chunk=8"], r"grad_cache_chunk is not supported by the fusion model"),
    (["eval.rerank_k=5"], r"eval.rerank_k must be 0 \(off\) or >= 10"),
    (["model.fusion.soft_mask=true", "loss.weights.itm=0"], r"model.fusion.soft_mask needs the ITM loss"),
])
def test_fusion_recipe_errors_name_the_key(tiny_overrides, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, tiny_overrides + FUSION_RUN + extra)


def test_fusion_run_trains_reranks_and_draws_gradcam(tmp_path, tiny_overrides, capsys):
    """loss.weights.{itc,itm,mlm} build the fusion model through the normal loop; evaluation adds ITM re-ranking;
    `polyalign inspect gradcam` draws per-word maps and scores the pointing game on shapes scenes."""
    metrics = train(load_config(None, tiny_overrides + FUSION_RUN + ["model.fusion.soft_mask=true"]), tmp_path / "run",
                    show_progress=False)
    for key in ("retrieval/t2i_R@1", "retrieval_itm/t2i_R@1", "retrieval_itm/i2t_R@10", "zeroshot/colour_acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert main(["inspect", "gradcam", str(tmp_path / "run"), "--items", "30", "--pictures", "2"]) == 0
    out = tmp_path / "run" / "inspect-gradcam"
    report = json.loads((out / "report.json").read_text())
    assert len(report["pictures"]) == 2 and all((out / p["png"]).stat().st_size > 1000 for p in report["pictures"])
    p = report["pointing"]
    assert p["trials"] >= 30 and 0.0 <= p["accuracy"] <= 1.0 and 0.0 < p["chance"] < 0.5
    assert sum(w["trials"] for w in p["by_word"].values()) == p["trials"]
    # --words: only pairs whose caption names the word are drawn; an unknown word is a clear error
    assert main(["inspect", "gradcam", str(tmp_path / "run"), "--items", "30", "--pictures", "2", "--words", "red",
                 "--out", str(tmp_path / "red")]) == 0
    red = json.loads((tmp_path / "red" / "report.json").read_text())["pictures"]
    assert red and all("red" in x["caption"].lower().split() for x in red)
    assert main(["inspect", "gradcam", str(tmp_path / "run"), "--items", "30", "--words", "zebra",
                 "--out", str(tmp_path / "zebra")]) != 0
    assert "names any of ['zebra']" in capsys.readouterr().err


def test_fusion_run_without_itm_skips_reranking_and_gradcam(tmp_path, tiny_overrides, capsys):
    """An ITC+MLM fusion model has no match score: evaluation reports ITC retrieval without ITM re-ranking (it used
    to call the missing ITM head), and `inspect gradcam` says why it cannot explain anything."""
    metrics = train(load_config(None, tiny_overrides + FUSION_RUN + ["loss.weights.itm=0"]), tmp_path / "run",
                    show_progress=False)
    assert 0.0 <= metrics["retrieval/t2i_R@1"] <= 1.0 and not any(k.startswith("retrieval_itm/") for k in metrics)
    assert main(["inspect", "gradcam", str(tmp_path / "run"), "--items", "10"]) == 1
    assert "trained no ITM head" in capsys.readouterr().err
