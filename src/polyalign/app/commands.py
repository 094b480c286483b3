"""The commands behind ``polyalign <command>``: each parses nothing, calls library functions and prints what the user
needs to see. ``polyalign.cli`` builds the parser and dispatches here; heavy imports stay inside each command so a
bad config key fails before torch is loaded."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


DEMO_ROWS = [  # (metric key, label) in the order the demo table prints them
    ("zeroshot/shape_acc", "zero-shot accuracy, shape (single-object test scenes)"),
    ("zeroshot/colour_acc", "zero-shot accuracy, colour (single-object test scenes)"),
    ("zeroshot/size_acc", "zero-shot accuracy, size"),
    ("zeroshot/position_acc", "zero-shot accuracy, position"),
    ("retrieval/t2i_R@1", "text → image R@1"),
    ("retrieval/t2i_R@5", "text → image R@5"),
    ("retrieval/t2i_R@10", "text → image R@10"),
    ("retrieval/i2t_R@1", "image → text R@1"),
    ("retrieval/i2t_R@5", "image → text R@5"),
    ("retrieval/i2t_R@10", "image → text R@10"),
    ("probe/shape_acc", "linear probe accuracy, shape"),
    ("train/data_time_frac", "data-loading share of step time"),
]


def results_table(metrics: dict) -> str:
    """A markdown table of the headline metrics (all others follow in metrics.json)."""
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {label} | {metrics[key]:.3f} |" for key, label in DEMO_ROWS if key in metrics]
    return "\n".join(lines)


def has_checkpoint(out: Path) -> bool:
    from polyalign.train.checkpoint import find_checkpoint

    return find_checkpoint(out / "checkpoints") is not None


def cmd_train(args) -> int:
    from polyalign.config import load_config
    from polyalign.config.resume import resume_config

    out = Path(args.out or Path("runs") / Path(args.config).stem)
    if getattr(args, "branch_from", None) and not (args.resume and has_checkpoint(out)):
        # (with --resume, a branch that already started continues as a run of its own)
        cfg = load_config(args.config, args.overrides)
        from polyalign.app.branch import start_branch, wait_for_branch

        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun one process copies, the others wait for it
            start_branch(args.branch_from, out)
        else:
            wait_for_branch(out)
        args.resume = True
    elif args.resume and (out / "config.yaml").is_file():  # the run's own config, with the overrides safe on resume
        cfg = resume_config(out / "config.yaml", args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)  # every config error before torch is even imported
    from polyalign.app.training import train
    from polyalign.distributed import shutdown

    try:
        metrics = train(cfg, out, resume=args.resume)
    finally:
        shutdown()
    if metrics:  # rank 0 (or a single process)
        print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def cmd_eval(args) -> int:
    from polyalign.connect import evaluate_connect_run, is_connect_run
    from polyalign.config import parse_override
    from polyalign.errors import ConfigError

    if is_connect_run(args.run_dir):  # a `polyalign connect` output: the connected model on its eval sets
        print(json.dumps(evaluate_connect_run(args.run_dir, args.overrides), indent=2, sort_keys=True))
        return 0
    bad = [key for key, _ in map(parse_override, args.overrides) if key != "eval" and not key.startswith("eval.")]
    if bad:  # the model, data and training of a run are its config.yaml's; other data: `polyalign embed`
        raise ConfigError(f"polyalign eval of a trained run takes only eval.* overrides, got {', '.join(bad)}: its "
                          f"model, data and training are those of {Path(args.run_dir) / 'config.yaml'} (to embed "
                          f"other data: polyalign embed RUN data.key=value ...)")
    from polyalign.app.runs import evaluate_run, load_run, merge_metrics
    from polyalign.data.build import build_datasets

    run = Path(args.run_dir)
    cfg, model, tok = load_run(run, args.which, args.overrides)
    metrics = evaluate_run(cfg, model, tok, build_datasets(cfg.data, cfg.train.seed), run)
    metrics = merge_metrics(run, metrics)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def cmd_sweep(args) -> int:
    from polyalign.app.sweep import run_sweep, summary_markdown

    out = args.out or str(Path("runs") / Path(args.config).stem)
    if args.grid:
        return _grid_sweep(args, out)
    if args.jobs != 1:
        from polyalign.errors import ConfigError

        raise ConfigError("--jobs runs the cells of a grid side by side: give --grid key=v1,v2 too")
    summary = run_sweep(args.config, args.seeds, out, args.overrides)
    print(summary_markdown(summary))
    print(f"summary: {Path(out) / 'summary.json'}")
    return 0


def _grid_sweep(args, out: str) -> int:
    from polyalign.app.grid import grid_markdown, run_grid

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] or None
    summary = run_grid(args.config, args.grid, args.seeds, out, args.overrides, args.jobs, metrics=metrics)
    print(grid_markdown(summary, metrics))
    print(f"summary: {Path(out) / 'summary.md'} (every metric: {Path(out) / 'grid.json'})")
    return 0


def cmd_table(args) -> int:
    from polyalign.app.sweep import compare_table

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    print(compare_table(args.sweeps, metrics, names, baseline=args.baseline or None), end="")
    return 0


def cmd_connect(args) -> int:
    from polyalign.connect import load_connect_config, run_connect

    cfg = load_connect_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    metrics = run_connect(cfg, out, resume=args.resume)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"connected model and metrics.json in {out}")
    return 0


def cmd_embed(args) -> int:
    from polyalign.app.export import export_embeddings

    info = export_embeddings(args.run_dir, args.modality, args.out, split=args.split or "", manifest=args.manifest or "",
                             texts=args.texts or "", classes=args.classes or "", overrides=args.overrides,
                             id_field=args.id_field, label_field=args.label_field, which=args.which)
    print(f"wrote {info['file']} ({info['rows']} × {info['dim']}) with its ids")
    return 0


def cmd_demo(args) -> int:
    from polyalign.app.lock import run_lock
    from polyalign.app.runs import check_demo_dir, start_demo_dir
    from polyalign.config import load_config
    from polyalign.app.training import train

    cfg = load_config(None, args.overrides)  # the defaults are the demo recipe
    out = Path(args.out)
    check_demo_dir(out)  # before the lock: a folder of other files is left without even a lock file
    with run_lock(out, "demo"):  # training below takes it again
        start_demo_dir(out)
        t0 = time.time()
        metrics = train(cfg, out)
    print(f"\npolyalign demo: {cfg.train.max_steps} steps × batch {cfg.train.batch_size} on procedural shapes, "
          f"{time.time() - t0:.0f} s (data generation + training + evaluation)\n")
    print(results_table(metrics))
    print(f"\nall metrics: {out / 'metrics.json'}; curves: {out / 'loss.png'}; "
          f"retrieval examples: {out / 'retrieval_examples.png'}")
    return 0


def cmd_data_shapes(args) -> int:
    from polyalign.data.export import export_manifest
    from polyalign.data.shapes import ShapesDataset

    for split, n in (("train", args.train_size), ("test", args.test_size)):
        ds = ShapesDataset(split, n, args.image_size, seed=args.seed)
        print(f"wrote {export_manifest(ds, args.out, split, label_field='shape')} ({n} items)")
    return 0


def cmd_data_emoji(args) -> int:
    from polyalign.data.emoji import build_emoji_dataset

    info = build_emoji_dataset(args.out, [s.strip() for s in args.styles.split(",") if s.strip()], args.source,
                               args.cache, allow_unlicensed=args.allow_unlicensed, size=args.size)
    print(f"emoji: {info['concepts']} concepts ({info['concepts_in_all_styles']} in every style), "
          f"{info['concept_groups']} concept groups, {info['image_size']} px")
    for style, rep in info["skipped"].items():
        why = ", ".join(f"{reason}: {n}" for reason, n in rep["skipped"].items()) or "none"
        matched = info["icon_matches"].get(style)
        print(f"  {style}: {info['rows_per_style'][style]} images; skipped {sum(rep['skipped'].values())} of "
              f"{rep['total']} ({why})" + (f"; e.g. {'; '.join(rep['examples'][:3])}" if rep["examples"] else "")
              + (f"; icons matched by {', '.join(f'{k} {n}' for k, n in matched.items())}" if matched else ""))
    print("rows: " + ", ".join(f"{name} {n}" for name, n in info["rows"].items()))
    split, per = info["concept_split"], info["concepts_per_split"]
    print(f"concept split: {per['concept_train']} train / {per['concept_test']} test concepts; groups on both "
          f"sides {split['grouped_split']['groups_on_both_sides']} (ungrouped hash split: "
          f"{split['ungrouped_hash_split']['groups_on_both_sides']} groups, "
          f"{split['ungrouped_hash_split']['test_concepts_with_a_variant_in_train']} test concepts with a variant "
          f"in train)")
    print(f"wrote {args.out} in {info['elapsed_s']:.1f} s (licences and counts in {Path(args.out) / 'README.txt'})")
    return 0


def cmd_data_speech(args) -> int:
    from polyalign.data.speech import VOICES, build_speech

    voices = tuple(v.strip() for v in args.voices.split(",") if v.strip()) if args.voices else VOICES
    path, report = build_speech(args.manifest, args.out, voices, seed=args.seed,
                                captions_per_item=args.captions_per_item, limit=args.limit)
    kept = len(path.read_text().splitlines())
    skipped = f"; skipped {report.n_skipped} ({dict(report.skipped)}), e.g. {report.examples[0]}" if report.n_skipped else ""
    print(f"wrote {path}: {kept} clips from {report.total} rows{skipped}")
    return 0


def cmd_data_shards(args) -> int:
    from polyalign.data.shards import INDEX, write_shards

    fields = tuple(f.strip() for f in args.label_fields.split(",") if f.strip())
    index = write_shards(args.manifest, args.out, args.shard_size, label_fields=fields)
    skipped = index["skipped"]
    n_skipped = sum(skipped["skipped"].values())
    why = f"; skipped {n_skipped} ({skipped['skipped']}), e.g. {skipped['examples'][0]}" if n_skipped else ""
    print(f"wrote {len(index['shards'])} shards, {index['samples']} samples from {skipped['total']} rows{why}; "
          f"listing: {Path(args.out) / INDEX}")
    return 0


def cmd_inspect_fdt(args) -> int:
    from polyalign.app.inspect_fdt import inspect_fdt

    out = inspect_fdt(args.run_dir, args.out, n_samples=args.samples, n_tokens=args.tokens, split=args.split)
    report = json.loads((out / "report.json").read_text())
    print(f"mean active FDT tokens: {report['mean_active_image']:.1f} per image, "
          f"{report['mean_active_text']:.1f} per caption ({report['entries_ever_active']} of "
          f"{report['codebook_size']} entries ever active)")
    print(f"wrote {out / 'report.html'} (samples.png, tokens.png, report.json)")
    return 0


def cmd_inspect_gradcam(args) -> int:
    from polyalign.app.inspect_gradcam import inspect_gradcam

    out = inspect_gradcam(args.run_dir, args.out, n_pictures=args.pictures, max_items=args.items, split=args.split,
                          words=[w.strip() for w in args.words.split(",") if w.strip()])
    report = json.loads((out / "report.json").read_text())
    if "pointing" in report:
        p = report["pointing"]
        print(f"pointing game: {p['accuracy']:.3f} of {p['trials']} colour/shape words peak on their object "
              f"(chance {p['chance']:.3f})")
    print(f"wrote {len(report['pictures'])} pictures and {out / 'report.html'}")
    return 0
