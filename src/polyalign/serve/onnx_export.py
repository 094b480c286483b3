"""Export a trained run's towers as ONNX graphs (raw inputs → L2-normalised embeddings), each checked against PyTorch.

``export_onnx(RUN, OUT)`` writes ``OUT/<modality>.onnx`` per tower (``model.modalities``), ``OUT/tokenizer.json``
(the run's, for a text tower) and ``OUT/onnx.json`` (inputs, outputs, the measured difference, the preprocessing).
Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript), with named dynamic axes. Each graph is
what ``encode_<modality>`` computes: the text tower's padding trim (a data-dependent shape) is skipped, which
changes nothing (padding is masked out of attention and pooling), and frozen towers' Python caches are bypassed.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from polyalign.errors import PolyalignError
from polyalign.train.files import write_json

STAGE = re.compile(r"\.onnx-export\.tmp\d+")  # the folder an export writes into first (a kill leaves it)
FORMAT, OUTPUT = "polyalign-onnx", "embeddings"  # "embedding" collides with the name of nn.Embedding's node
EXPORT_BATCH, CHECK_BATCHES = 2, (1, 5)  # the check runs batch sizes other than the export's
CAPTIONS = ["a red heart", "two small blue stars on a white background", "a green triangle", "a smiling face",
            "an emoji of a yellow circle with sunglasses and a big grin", "x"]


class Tower(torch.nn.Module):
    """One tower of ``model`` as a module: its raw inputs → ``encode_<modality>``."""

    def __init__(self, model, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, *inputs):
        return getattr(self.model, f"encode_{self.modality}")(*inputs)


def _specs(cfg, tok, modality: str) -> dict:
    """Input names, dtypes, axes (named: dynamic), an input maker ``make(batch)`` and the preprocessing text."""
    g = torch.Generator().manual_seed(0)
    if modality == "image":
        s = cfg.data.image_size
        return dict(names=["pixels"], dtypes=["float32"], axes=[["batch", 3, s, s]],
                    make=lambda b: (torch.rand(b, 3, s, s, generator=g),),
                    preprocessing=f"RGB pixels resized to {s}x{s}, float32 in [0, 1], NCHW; the encoder's "
                                  f"normalisation (mean/std) is inside the graph: do not normalise")
    if modality == "text":
        ctx = cfg.model.text.context_length
        return dict(names=["ids", "mask"], dtypes=["int64", "bool"], axes=[["batch", "length"]] * 2,
                    make=lambda b: tok([CAPTIONS[(i + b) % len(CAPTIONS)] for i in range(b)]),
                    preprocessing=f"tokenizer.json (HF `tokenizers`): ids int64 and mask bool (True on real "
                                  f"tokens) of the encoding padded with [PAD] and truncated to {ctx} tokens (the run's "
                                  f"context length)")
    if modality == "audio":
        def make(b):
            audio, mask = 0.1 * torch.randn(b, 16000, generator=g), torch.ones(b, 16000, dtype=torch.bool)
            for i in range(1, b):  # clips of several lengths, zero-padded on the right
                n = 4000 + 12000 * i // b
                audio[i, n:], mask[i, n:] = 0.0, False
            return audio, mask
        return dict(names=["audio", "mask"], dtypes=["float32", "bool"], axes=[["batch", "samples"]] * 2, make=make,
                    preprocessing="mono float32 waveforms at 16 kHz (B, T), zero-padded on the right; mask bool "
                                  "(B, T), True on real samples; the log-mel is inside the graph")
    if modality == "points":
        n = cfg.data.n_points
        return dict(names=["points"], dtypes=["float32"], axes=[["batch", n, 3]],
                    make=lambda b: (torch.rand(b, n, 3, generator=g) * 2 - 1,),
                    preprocessing=f"point clouds (B, {n}, 3) float32 xyz, as the run's data sampled them")
    raise PolyalignError(f"cannot export a {modality!r} tower to ONNX (image | text | audio | points)")


def check_out_dir(out: Path) -> dict | None:
    """``out`` is missing, empty or a previous export (returns its onnx.json); else a ``PolyalignError`` naming it."""
    if not out.exists() or (out.is_dir() and all(STAGE.fullmatch(e.name) for e in out.iterdir())):
        return None
    if not out.is_dir():
        raise PolyalignError(f"{out} is a file, not a folder: pass another output folder")
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((out / "onnx.json").read_text())
        if isinstance(previous, dict) and previous.get("format") == FORMAT:
            return previous
    raise PolyalignError(f"{out} is not empty and holds no ONNX export of polyalign (no onnx.json of ours): pass "
                         f"another output folder, or move its files away")


@contextlib.contextmanager
def _export_mode(model):
    """No padding trim (its shape depends on the data), no Python caches of frozen towers, quiet exporter logs."""
    import polyalign.models.dual as dual
    import polyalign.models.fusion as fusion

    trims = dual.trim_padding, fusion.trim_padding
    cached = [(m, m.cache_enabled) for m in model.modules() if hasattr(m, "cache_enabled")]
    log = logging.getLogger("torch")
    level = log.level
    dual.trim_padding = fusion.trim_padding = lambda ids, mask: (ids, mask)
    for m, _ in cached:
        m.cache_enabled = False
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # deprecation notes, axis names, partial graphs of a failed strategy
            yield
    finally:
        dual.trim_padding, fusion.trim_padding = trims
        for m, enabled in cached:
            m.cache_enabled = enabled
        log.setLevel(level)


def _export(model, modality: str, spec: dict, path: Path, opset: int | None) -> int:
    """Write ``path`` (weights inside the file); returns the graph's opset. A tower whose length axis the trace fixes
    (e.g. FDT's text head) is exported again with that axis at the example's size (``spec["axes"]`` updated)."""
    example = tuple(spec["make"](EXPORT_BATCH))
    for attempt in ("all", "batch"):
        dynamic = tuple({i: a for i, a in enumerate(axes) if isinstance(a, str)} for axes in spec["axes"])
        try:
            with _export_mode(model):
                program = torch.onnx.export(Tower(model, modality).eval(), example, None, input_names=spec["names"],
                                            output_names=[OUTPUT], opset_version=opset, dynamic_shapes=(dynamic,),
                                            dynamo=True, verbose=False)
            break
        except Exception as e:  # the exporter raises many kinds
            fixed = [[a if a == "batch" or not isinstance(a, str) else x.shape[i] for i, a in enumerate(axes)]
                     for axes, x in zip(spec["axes"], example)]
            if attempt == "all" and fixed != spec["axes"]:
                spec["axes"] = fixed
                continue
            cause = str(e.__cause__ or e).split("## Exception summary")[-1].strip()  # torch.export's own message
            raise PolyalignError(f"the {modality} tower could not be exported to ONNX: "
                                 f"{(cause.splitlines() or [''])[0]}") from e
    program.save(str(path), external_data=False)
    return next(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx"))


def _check(model, modality: str, spec: dict, path: Path, atol: float) -> tuple[float, int]:
    """Max |ONNX Runtime − PyTorch| over fresh inputs of ``CHECK_BATCHES`` (also of another length) and the width."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for b in CHECK_BATCHES:
        inputs = spec["make"](b)
        variants = [inputs]  # the dynamic length too: text cut to the longest caption, audio to 0.6 s
        if modality in ("text", "audio") and isinstance(spec["axes"][0][1], str):
            n = int(inputs[1].sum(1).max()) if modality == "text" else 9600
            variants.append(tuple(x[:, :n].contiguous() for x in inputs))
        for v in variants:
            with torch.no_grad():
                ref = getattr(model, f"encode_{modality}")(*v).float().numpy()
            got = session.run([OUTPUT], {k: x.numpy() for k, x in zip(spec["names"], v)})[0]
            if got.shape != ref.shape:
                raise PolyalignError(f"{path}: ONNX output shape {got.shape} != PyTorch's {ref.shape} at batch {b}")
            worst = max(worst, float(abs(got - ref).max()))
    if not worst <= atol:  # NaN fails too
        raise PolyalignError(f"{path}: ONNX Runtime differs from PyTorch by {worst:.3g} (> atol {atol:g}) on the "
                             f"{modality} tower")
    return worst, ref.shape[-1]


def export_onnx(run_dir, out_dir, which: str = "latest", opset: int | None = None, atol: float = 1e-4) -> dict:
    """Export and check every tower of the run's ``which`` checkpoint into ``out_dir``; returns onnx.json's content."""
    from polyalign.app.runs import load_run
    from polyalign.connect import is_connect_run
    from polyalign.train.checkpoint import find_checkpoint

    run_dir, out = Path(run_dir), Path(out_dir)
    if is_connect_run(run_dir):
        raise PolyalignError(f"{run_dir} is a connect run (projectors over precomputed embeddings): it has no towers "
                             f"to export; export the source runs its config names instead")
    previous = check_out_dir(out)
    cfg, model, tok = load_run(run_dir, which)
    made, modalities = not out.exists(), tuple(model.modalities)
    stage = out / f".onnx-export.tmp{os.getpid()}"
    stage.mkdir(parents=True, exist_ok=True)
    try:
        towers, opsets = {}, set()
        for m in modalities:
            spec, path = _specs(cfg, tok, m), stage / f"{m}.onnx"
            opsets.add(_export(model, m, spec, path, opset))
            diff, embed_dim = _check(model, m, spec, path, atol)
            towers[m] = {"file": path.name, "inputs": [{"name": n, "dtype": d, "shape": a} for n, d, a in
                                                        zip(spec["names"], spec["dtypes"], spec["axes"])],
                         "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", embed_dim]},
                         "embed_dim": embed_dim, "normalised": "L2 (unit length)", "max_abs_diff": diff, "atol": atol,
                         "batch_sizes_checked": list(CHECK_BATCHES), "export_batch_size": EXPORT_BATCH,
                         "preprocessing": spec["preprocessing"] + ("" if len(axes := spec["axes"][0]) != 2 else
                                          f"; '{axes[1]}' is dynamic" if isinstance(axes[1], str) else
                                          f"; the length is fixed: exactly {axes[1]}")}
        files = [t["file"] for t in towers.values()]
        if "text" in modalities:
            shutil.copyfile(run_dir / "tokenizer.json", stage / "tokenizer.json")
            files.append("tokenizer.json")
        for f in files:  # each replaced atomically; onnx.json last: it marks a complete export
            os.replace(stage / f, out / f)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: nothing of ours stays behind
        raise
    stage.rmdir()
    manifest = {"format": FORMAT, "version": 1, "run": str(run_dir.resolve()), "checkpoint": which,
                "step": find_checkpoint(run_dir / "checkpoints", which), "model": type(model).__name__,
                "modalities": list(modalities), "exporter": f"torch.onnx.export(dynamo=True), torch "
                f"{torch.__version__}", "opset": max(opsets), "files": files, "towers": towers,
                "dynamic_axes": "named axes ('batch', 'length', 'samples') are dynamic; numbers are fixed"}
    for stale in set((previous or {}).get("files", [])) - set(files) - {"onnx.json"}:  # ours, from the last export
        if "/" not in stale and (out / stale).is_file():
            (out / stale).unlink()
    write_json(out / "onnx.json", manifest)
    return manifest
