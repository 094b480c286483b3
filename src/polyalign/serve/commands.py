"""The commands behind ``polyalign index | search | serve | export``: they parse nothing, call the serve layer and
print what the user needs to see."""
from __future__ import annotations

import json
from pathlib import Path


def cmd_index(args) -> int:
    from polyalign.distributed import is_main, shutdown
    from polyalign.serve.index import build_index

    try:
        info = build_index(args.run_dir, args.out, manifest=args.manifest or "", folder=args.folder or "",
                           split=args.split or "", id_field=args.id_field, kind=args.kind, shard_size=args.shard_size,
                           which=args.which, texts=not args.no_texts)
    finally:
        shutdown()
    if is_main() and info:
        for name, part in info["parts"].items():
            recall = f", recall@10 {part['recall@10']:.3f} vs exact ({part.get('ef_search') or part.get('nprobe')})" \
                if "recall@10" in part else ""
            print(f"{name}: {part['items']} items × {part['dim']} in {part['shards']} shards, {part['kind']}{recall}")
            if part.get("recall@10", 1) < part.get("target_recall", 0):
                print(f"warning: {name}'s recall@10 {part['recall@10']:.3f} is below {part['target_recall']} even at "
                      f"the largest search setting: use --kind flat, or a denser graph")
        if info["skipped"]:
            print(f"skipped: {', '.join(f'{why}: {n}' for why, n in info['skipped'].items())}")
        print(f"wrote {Path(args.out) / 'info.json'} in {info['elapsed_s']:.1f} s; search it: "
              f"polyalign search {args.out} \"a query\" or polyalign serve {args.out}")
    return 0


def cmd_search(args) -> int:
    from polyalign.errors import ConfigError
    from polyalign.serve.search import Searcher

    if bool(args.query) == bool(args.image):
        raise ConfigError("give a text query or --image PATH (one of them)")
    s = Searcher(args.index, args.run or None, backend=args.backend)
    hits = s.search(text=args.query or None, image=args.image or None, k=args.k, target=args.target)
    if args.json:
        print(json.dumps([h.__dict__ for h in hits], indent=2, ensure_ascii=False))
        return 0
    width = max([len(h.id) for h in hits] + [2])
    print(f"{'rank':>4}  {'id':<{width}}  score   caption")
    for h in hits:
        print(f"{h.rank:>4}  {h.id:<{width}}  {h.score:.4f}  {h.caption}")
    return 0


def cmd_serve(args) -> int:
    from polyalign.serve.http import serve

    serve(args.index, args.host, args.port, args.run or None, args.device, args.backend, args.threads)
    return 0


def cmd_export(args) -> int:
    from polyalign.serve.onnx_export import export_onnx

    which = args.which
    if which == "auto":  # as polyalign.load: the best checkpoint when the run kept one
        which = "best" if (Path(args.run_dir) / "checkpoints" / "best.json").is_file() else "latest"
    if getattr(args, "hf", None):
        from polyalign.serve.hf_export import export_hf

        info = export_hf(args.run_dir, args.hf, which=which)
        diff = max(info["max_abs_diff"].values())
        print(f"wrote {args.hf} ({info['class']}, step {info['step']}; transformers vs PyTorch max |diff| {diff:.2e}); "
              f"load it: transformers.CLIPModel.from_pretrained({str(args.hf)!r})")
        return 0
    info = export_onnx(args.run_dir, args.onnx, which=which)
    for name, tower in info["towers"].items():
        print(f"{name}: {tower['file']} (onnxruntime vs PyTorch max |diff| {tower['max_abs_diff']:.2e})")
    print(f"wrote {Path(args.onnx) / 'onnx.json'}")
    return 0
