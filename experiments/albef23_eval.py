"""Issue 23, item 4: the ITM probes that target the soft-mask mechanism, on a trained fusion run.

    python experiments/albef23_eval.py RUN_DIR [--out FILE] [--items 500] [--seed 0] [--split test] [--threads 1]

Loads the run (config, tokenizer, latest checkpoint) and its ``--split`` data set as ``polyalign eval`` does, runs
``polyalign.eval.itm_probes.itm_probe_metrics`` (controlled hard negatives, the salient object erased, the pointing
game per word class, multi-positive ITM re-ranking: see that module for the definitions) and writes the metrics
JSON to ``--out`` (default RUN_DIR/itm_probes.json), with the run, split, item count, seed and wall time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def probe_run(run_dir: Path, out: Path | None = None, max_items: int = 500, seed: int = 0, split: str = "test",
              device: str = "cpu") -> dict:
    """The ``itm_probe/*`` metrics of a fusion run, written as JSON to ``out`` (default RUN_DIR/itm_probes.json)."""
    from polyalign.app.runs import load_run
    from polyalign.data.build import build_datasets
    from polyalign.errors import PolyalignError
    from polyalign.eval.itm_probes import itm_probe_metrics
    from polyalign.models.fusion import FusionModel

    cfg, model, tok = load_run(run_dir)
    if not isinstance(model, FusionModel) or not model.has_itm:
        raise PolyalignError(f"{run_dir} is not a fusion run with an ITM head (loss.weights.itm > 0)")
    ds = build_datasets(cfg.data, cfg.train.seed, show_progress=False).get(split)
    if ds is None:
        raise PolyalignError(f"{run_dir}: the data config has no {split!r} split")
    t0 = time.perf_counter()
    with torch.random.fork_rng():  # the probes draw from their own seeded generators; keep the global RNG as it was
        metrics = itm_probe_metrics(model.to(device), ds, tok, device=device, max_items=max_items, seed=seed)
    report = {"run": str(run_dir), "split": split, "max_items": max_items, "seed": seed,
              "wall_s": round(time.perf_counter() - t0, 2), "metrics": metrics}
    out = out or run_dir / "itm_probes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=False))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="metrics JSON (default RUN_DIR/itm_probes.json)")
    p.add_argument("--items", type=int, default=500, help="items of the split to probe (drawn with --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = probe_run(args.run_dir, args.out, args.items, args.seed, args.split, args.device)
    print(json.dumps({k: round(v, 4) for k, v in report["metrics"].items()}, indent=1))
    print(f"wrote {args.out or args.run_dir / 'itm_probes.json'} ({report['wall_s']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
