"""Command line: the parser and the dispatch to ``polyalign.app.commands``.

    polyalign train CONFIG.yaml [key=value ...] [--out DIR] [--resume | --branch-from RUN[@STEP]]
    polyalign eval RUN_DIR [key=value ...] [--which latest|best]
    polyalign demo [--out DIR] [key=value ...]
    polyalign sweep CONFIG.yaml --seeds 0,1,2 --out DIR [key=value ...]
    polyalign sweep CONFIG.yaml --grid KEY=V1,V2 [--grid ...] --seeds 0,1,2 [--jobs N] --out DIR [key=value ...]
    polyalign table SWEEP_DIR [SWEEP_DIR ...] --metrics a,b [--names x,y] [--baseline NAME]
    polyalign connect CONFIG.yaml [key=value ...] [--out DIR] [--resume]
    polyalign embed RUN_DIR [data.key=value ...] --modality M (--split S | --manifest M | --texts F) --out PREFIX
    polyalign data shapes --out DIR [--train-size N] [--test-size N]
    polyalign data speech --manifest M --out DIR [--voices v1,v2] [--captions-per-item K] [--limit N]
    polyalign data shards --manifest M --out DIR [--shard-size N] [--label-fields a,b]
    polyalign data emoji --out DIR [--styles google,twitter,fluent,emojione] [--size N] [--source PATH ...] [--cache DIR]
    polyalign index RUN_DIR (--manifest M | --folder DIR | --split S) --out IDX [--kind flat|hnsw|ivfpq]
    polyalign search IDX "a red heart" [-k 10] [--image PATH] [--target image|text]
    polyalign serve IDX [--port 8000] [--host 127.0.0.1]
    polyalign export RUN_DIR (--onnx OUT | --hf OUT)
    polyalign --version

Options and ``key=value`` overrides mix in any order (``polyalign eval RUN --which best eval.max_captions=1``).
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib.metadata
import signal
import sys

from polyalign.app.commands import (cmd_connect, cmd_data_emoji, cmd_data_shapes, cmd_data_shards, cmd_data_speech,
                                    cmd_demo, cmd_embed, cmd_eval, cmd_inspect_fdt, cmd_inspect_gradcam, cmd_sweep,
                                    cmd_table, cmd_train)
from polyalign import __version__
from polyalign.errors import PolyalignError
from polyalign.serve.commands import cmd_export, cmd_index, cmd_search, cmd_serve


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None



class _Parser(argparse.ArgumentParser):
    """A parser whose options and positionals mix in any order (argparse's intermixed parsing), so an override may
    follow an option: ``eval RUN --which best eval.max_captions=1``. A parser with subcommands parses as usual (argparse
    cannot intermix those) and hands the rest to the subcommand's parser, which intermixes."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls back here for each of its two passes
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _version() -> str:
    """The installed distribution's version; the package's own when run from a source tree that is not installed."""
    try:
        return importlib.metadata.version("polyalign")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="polyalign", description="Multimodal contrastive representation learning.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("config", help="recipe YAML (see configs/)")
    t.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.max_steps=100")
    t.add_argument("--out", help="run directory (default runs/<recipe name>)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    t.add_argument("--branch-from", metavar="RUN[@STEP]", help="start this run from another run's checkpoint (the "
                   "latest, or STEP): weights, optimizer and step are copied, then training continues under CONFIG; with "
                   "--resume, an OUT that already holds the branch continues instead")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="re-evaluate a run (a training or a `polyalign connect` run) and print its metrics as JSON")
    e.add_argument("run_dir")
    e.add_argument("overrides", nargs="*", default=[], help="dotted overrides of eval.* keys, e.g. eval.max_captions=1 "
                   "(connect runs: eval.* and inputs.*, e.g. eval.c_test=other.npy)")
    e.add_argument("--which", choices=("latest", "best"), default="latest", help="checkpoint to evaluate")
    e.set_defaults(func=cmd_eval)
    g = sub.add_parser("data", help="build datasets")
    gs = g.add_subparsers(dest="dataset", required=True)
    sh = gs.add_parser("shapes", help="write the procedural shapes data as PNGs + JSONL manifests (train/test)")
    sh.add_argument("--out", required=True)
    sh.add_argument("--train-size", type=int, default=2000)
    sh.add_argument("--test-size", type=int, default=500)
    sh.add_argument("--image-size", type=int, default=48)
    sh.add_argument("--seed", type=int, default=0)
    sh.set_defaults(func=cmd_data_shapes)
    em = gs.add_parser("emoji", help="emoji images (npm emoji-datasource-<style> PNGs, @iconify-json SVG sets) + "
                                     "names/tags from emojibase-data, with concept and leave-one-style-out splits")
    em.add_argument("--out", required=True)
    em.add_argument("--styles", default="google,twitter",
                    help="comma-separated, of google, twitter, fluent, emojione (open licences); the last one is the "
                         "style_test split, and each one a leave-one-style-out test")
    em.add_argument("--size", type=int, default=64, help="image side in pixels (SVG styles are drawn at this size)")
    em.add_argument("--source", action="append", default=[], metavar="PATH",
                    help="an `npm pack` tarball or extracted package folder (repeatable); others come from npm")
    em.add_argument("--cache", default="cache/npm", help="where `npm pack` tarballs are kept and reused")
    em.add_argument("--allow-unlicensed", action="store_true", help="allow styles that are not openly licensed")
    em.set_defaults(func=cmd_data_emoji)
    sp = gs.add_parser("speech", help="speak a manifest's captions with espeak-ng → 16 kHz WAVs + audio–text manifest")
    sp.add_argument("--manifest", required=True, help="an image–text manifest (JSONL/CSV)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--voices", default="", help="comma-separated espeak-ng voices (default: 8 English voices)")
    sp.add_argument("--captions-per-item", type=int, default=1)
    sp.add_argument("--limit", type=int, default=None, help="only the first N rows")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_data_speech)
    sd = gs.add_parser("shards", help="write a manifest's usable rows as webdataset-style tar shards "
                                      "(KEY.png|jpg + KEY.json) and OUT/shards.json, for streaming")
    sd.add_argument("--manifest", required=True, help="an image–text manifest (JSONL/CSV)")
    sd.add_argument("--out", required=True, help="shard folder: OUT/00000.tar, ... and OUT/shards.json")
    sd.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    sd.add_argument("--label-fields", default="label", help="comma-separated label columns (default label)")
    sd.set_defaults(func=cmd_data_shards)
    sw = sub.add_parser("sweep", help="train a recipe once per seed; write mean ± std of every metric")
    sw.add_argument("config", help="recipe YAML (see configs/)")
    sw.add_argument("overrides", nargs="*", default=[], help="dotted overrides applied to every seed")
    sw.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    sw.add_argument("--out", help="sweep directory (default runs/<recipe name>); seed s trains into OUT/seed-s")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a grid key and its values (repeatable): every combination is a cell, trained with every "
                         "seed into OUT/<cell>/seed-s; OUT/summary.md has one row per cell")
    sw.add_argument("--jobs", type=int, default=1, help="grid cells trained side by side (train.threads split)")
    sw.add_argument("--metrics", default="", help="grid sweeps: comma-separated metric columns of the table")
    sw.set_defaults(func=cmd_sweep)
    tb = sub.add_parser("table", help="a markdown table of several sweeps' mean ± std, and each sweep's paired "
                                      "difference (by seed) to a baseline sweep with its 95%% t-interval")
    tb.add_argument("sweeps", nargs="+", help="sweep directories (holding summary.json)")
    tb.add_argument("--metrics", required=True, help="comma-separated metric keys, e.g. retrieval/t2i_R@1")
    tb.add_argument("--names", default="", help="comma-separated row names (default: directory names)")
    tb.add_argument("--baseline", default="", help="the row name of the sweep the others are compared with, "
                                                   "seed by seed (default: the first)")
    tb.set_defaults(func=cmd_table)
    c = sub.add_parser("connect", help="connect two embedding spaces that share a modality (C-MCR) from embedding files")
    c.add_argument("config", help="YAML naming the embedding files and hyperparameters (keys: see polyalign.connect)")
    c.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.epochs=10 method.mode=anchor_x")
    c.add_argument("--out", help="output directory (default runs/<config name>)")
    c.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    c.set_defaults(func=cmd_connect)
    em = sub.add_parser("embed", help="write a run's embeddings of some items as PREFIX.npy + PREFIX.ids.txt (for connect)")
    em.add_argument("run_dir")
    em.add_argument("overrides", nargs="*", default=[], help="dotted overrides of the run's config, e.g. data.seed=1 data.test_size=500")
    em.add_argument("--modality", required=True, choices=("image", "text", "audio", "points"), help="the tower to use")
    em.add_argument("--split", help="items of the run's data: train | val | test")
    em.add_argument("--manifest", help="an image–text or speech manifest (every row must be usable)")
    em.add_argument("--texts", help="a text file, one text per line (ids: the texts)")
    em.add_argument("--classes", help="a label field: write its zero-shot class embeddings (ids: class names)")
    em.add_argument("--id-field", default="", help="manifest column holding the ids (default: the row index)")
    em.add_argument("--label-field", default="", help="also write PREFIX.labels.txt from this label field/column")
    em.add_argument("--which", choices=("latest", "best"), default="latest", help="checkpoint to use")
    em.add_argument("--out", required=True, help="output prefix: PREFIX.npy, PREFIX.ids.txt, ...")
    em.set_defaults(func=cmd_embed)
    ins = sub.add_parser("inspect", help="pictures of what a trained model learned")
    ins_sub = ins.add_subparsers(dest="what", required=True)
    fd = ins_sub.add_parser("fdt", help="FDT runs: top tokens of samples; words and image patches of the most used tokens")
    fd.add_argument("run_dir")
    fd.add_argument("--out", default=None, help="report folder (default RUN_DIR/inspect-fdt)")
    fd.add_argument("--samples", type=int, default=6, help="sample image–caption pairs shown")
    fd.add_argument("--tokens", type=int, default=8, help="most used tokens shown")
    fd.add_argument("--split", default="test")
    fd.set_defaults(func=cmd_inspect_fdt)
    gc = ins_sub.add_parser("gradcam", help="fusion runs: per-word Grad-CAM heat maps over sample images "
                                           "(+ a pointing-game score on shapes)")
    gc.add_argument("run_dir")
    gc.add_argument("--out", default=None, help="report folder (default RUN_DIR/inspect-gradcam)")
    gc.add_argument("--pictures", type=int, default=8)
    gc.add_argument("--items", type=int, default=500, help="test items scored by the pointing game")
    gc.add_argument("--split", default="test")
    gc.add_argument("--words", default="", help="comma-separated: draw only pairs whose caption names one of these "
                                                "words, e.g. red,star")
    gc.set_defaults(func=cmd_inspect_gradcam)
    _serve_parsers(sub)
    d = sub.add_parser("demo", help="train and evaluate the default recipe on the embedded shapes data")
    d.add_argument("overrides", nargs="*", default=[], help="dotted overrides")
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(func=cmd_demo)
    return p


def _serve_parsers(sub) -> None:
    """``index``, ``search``, ``serve``, ``export``: using a trained run."""
    ix = sub.add_parser("index", help="embed a manifest, an image folder or a split with a run's towers into a FAISS "
                                      "index (shards resume after a kill; under torchrun each rank embeds its share)")
    ix.add_argument("run_dir")
    ix.add_argument("--out", required=True, help="index folder")
    ix.add_argument("--manifest", help="an image–text manifest (JSONL/CSV); bad rows are counted and skipped")
    ix.add_argument("--folder", help="a folder of images (ids: relative paths, captions: file names)")
    ix.add_argument("--split", help="a split of the run's own data: train | val | test")
    ix.add_argument("--id-field", default="", help="manifest field holding the ids (default: the row number)")
    ix.add_argument("--kind", choices=("flat", "hnsw", "ivfpq"), default="flat",
                    help="flat: exact inner product (default); hnsw / ivfpq: approximate, for large sets, tuned to "
                         "recall@10 >= 0.95 against exact (measured and stored in info.json)")
    ix.add_argument("--shard-size", type=int, default=4096, help="items per shard (the unit of resuming)")
    ix.add_argument("--no-texts", action="store_true", help="do not index the captions (image → text search)")
    ix.add_argument("--which", choices=("auto", "best", "latest"), default="auto", help="checkpoint to use")
    ix.set_defaults(func=cmd_index)
    se = sub.add_parser("search", help="search an index by text or by image; prints ranked ids, scores, captions")
    se.add_argument("index")
    se.add_argument("query", nargs="?", default="", help="the text query")
    se.add_argument("--image", default="", help="search by this image file instead")
    se.add_argument("-k", type=int, default=10, help="how many results (1..100)")
    se.add_argument("--target", default="", help="image (default: the items) or text (the captions)")
    se.add_argument("--run", default="", help="the run whose towers encode the query (default: the index's)")
    se.add_argument("--backend", choices=("faiss", "torch"), default="faiss")
    se.add_argument("--json", action="store_true", help="print JSON")
    se.set_defaults(func=cmd_search)
    sv = sub.add_parser("serve", help="the search service and its web page (FastAPI + uvicorn)")
    sv.add_argument("index")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    sv.add_argument("--run", default="", help="the run whose towers encode queries (default: the index's)")
    sv.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    sv.add_argument("--backend", choices=("faiss", "torch"), default="faiss")
    sv.add_argument("--threads", type=int, default=0, help="torch and FAISS threads (0: their defaults); 1 can be "
                    "faster for single queries on a busy machine (benchmarks/results/search.md)")
    sv.set_defaults(func=cmd_serve)
    ex = sub.add_parser("export", help="export a run's towers (ONNX, or a Hugging Face CLIPModel / "
                        "VisionTextDualEncoderModel folder), each checked against PyTorch")
    ex.add_argument("run_dir")
    fmt = ex.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--onnx", help="output folder: <tower>.onnx, onnx.json, tokenizer.json")
    fmt.add_argument("--hf", help="output folder that transformers loads offline: CLIPModel.from_pretrained(OUT) "
                     "(vit + causal text towers) or VisionTextDualEncoderModel (vit + a [CLS]-pooled HF text tower)")
    ex.add_argument("--which", choices=("auto", "best", "latest"), default="auto", help="checkpoint to export")
    ex.set_defaults(func=cmd_export)


def _stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's stack to stderr: where is a run that seems stuck (e.g. a rank
    waiting in a collective)? A crash of native code (SIGSEGV, SIGABRT, ...) prints them too, before the process
    dies. Skipped where there is no SIGUSR1 or stderr is not a real file (captured output)."""
    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _stacks_on_sigusr1()
    try:
        return args.func(args)
    except PolyalignError as e:
        print(f"polyalign {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
