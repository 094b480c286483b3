"""Search service benchmark: ``polyalign serve`` over synthetic indexes of 100k and 1M items, side by side.

    .venv/bin/python benchmarks/bench_search.py --run runs/emoji4/concept/tuned/seed-0 --sizes 100000,1000000

For each size it writes an index folder in ``build_index``'s layout (shards of ``--shard-size`` rows, jsonl metadata,
``info.json`` with parts {"image": ...} and "run" pointing at RUN), builds ``flat`` and ``hnsw`` with
``polyalign.serve.faiss_index.build_faiss`` (HNSW tuned to recall@10 >= 0.95 vs exact on ~1000 text queries), then for
FAISS exact, FAISS HNSW and torch top-k starts ``polyalign serve`` as a subprocess and loads it with 1 sequential
client and with ``--clients`` concurrent keep-alive clients (GET /search?text=...&k=10, varied emoji captions), after
a warm-up. It also times the components in-process (text encode of one query; search of one query per backend) so
the table shows where the time goes. Results: benchmarks/results/search.md and search.json.

Synthetic items (stated in the results): the run's text tower encodes ``--clusters`` distinct emoji captions; these
unit vectors are the cluster centres (real positions in the run's embedding space, so the text queries fall where
items are). Each item is a centre (chosen with Zipf-like weights 1/(rank+10)) plus anisotropic Gaussian noise with a
decaying spectrum (std of component i ∝ (i+1)^-0.75 in a random rotation, total norm ``--noise``), re-normalised:
clustered, with a low effective dimension as real embeddings have, not isotropic noise (on which HNSW is at its
worst and unrepresentative). The recall queries are the embeddings of ~1000 other captions (cross-modal, as
``build_index`` does), the HTTP queries all the captions of data/emoji4/all.jsonl.

``--variants default,threads1`` also serves every backend with OMP_NUM_THREADS=1 (a proposed fix, not the code's
default: torch's 2 intra-op threads on 2 busy cores make one query's text encode several times slower).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from search_corpus import captions, encode_cached, run_embed_dim, write_index
from search_load import pct, rss_mb, start_server, stop_server, load_test
from search_report import RESULTS, backends, targets, write_report
from timing import load_avg, log

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = "runs/emoji4/concept/tuned/seed-0"  # experiments/emoji4_table.sh (its tuned row, seed 0)




# ---------------------------------------------------------------- in-process components

def time_calls(fn, args_list, repeat_min=1) -> list[float]:
    out = []
    for a in args_list:
        t0 = time.perf_counter()
        fn(a)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def components_encode(enc, texts: list[str]) -> dict:
    import torch

    from polyalign.eval.embed import inference

    res = {}
    default_threads = torch.get_num_threads()
    for threads in (default_threads, 1):
        torch.set_num_threads(threads)
        for t in texts[:5]:
            enc.encode("text", [t], numpy=True)
        one = time_calls(lambda t: enc.encode("text", [t], numpy=True), texts[5:45])
        eight = time_calls(lambda i: enc.encode("text", texts[i:i + 8], numpy=True), range(50, 50 + 8 * 10, 8))
        res[f"threads={threads}"] = {"encode_1_p50_ms": statistics.median(one), "encode_1_p90_ms": pct(one, 90),
                                     "encode_8_p50_ms": statistics.median(eight)}
    torch.set_num_threads(default_threads)
    ev = time_calls(lambda _: inference(enc.model).__enter__(), range(50))  # model.eval() + no_grad, per encode call
    res["inference_ctx_enter_p50_ms"] = statistics.median(ev)
    return res


def components_search(base: Path, emb: np.ndarray, qv: np.ndarray, kinds: list[str]) -> dict:
    import torch

    from polyalign.eval.retrieval import topk_chunked
    from polyalign.serve.faiss_index import read_index, recall_at_10, set_knob

    res = {}
    q1 = [qv[i : i + 1] for i in range(min(200, len(qv)))]
    q8 = [qv[i : i + 8] for i in range(0, min(400, len(qv) - 8), 8)]
    indexes, ladders = {}, {}
    for kind in kinds:
        info = json.loads((base / kind / "info.json").read_text())["parts"]["image"]
        indexes[kind] = read_index(base / kind / "image.faiss", info)
        ladders[kind] = info.get("ladder")
    temb = torch.from_numpy(emb)
    searchers = {f"faiss-{k}": (lambda q, ix=ix: ix.search(q, 10)) for k, ix in indexes.items()}
    searchers["torch-topk"] = lambda q: topk_chunked(torch.from_numpy(q).float(), temb, 10)
    import faiss

    t_default, f_default = torch.get_num_threads(), faiss.omp_get_max_threads()
    for suffix, (tt, ft) in (("", (t_default, f_default)), ("@threads1", (1, 1))):
        torch.set_num_threads(tt)
        faiss.omp_set_num_threads(ft)
        for fn in searchers.values():
            for q in q1[:10]:
                fn(q)
        one = {name: [] for name in searchers}
        eight = {name: [] for name in searchers}
        for q in q1:  # interleaved, so a burst of load on the shared machine hits every backend alike
            for name, fn in searchers.items():
                one[name] += time_calls(fn, [q])
        for q in q8:
            for name, fn in searchers.items():
                eight[name] += time_calls(fn, [q])
        for name in searchers:
            res[name + suffix] = {"search_1_p50_ms": statistics.median(one[name]), "search_1_p99_ms": pct(one[name], 99),
                                  "search_8_p50_ms": statistics.median(eight[name])}
    torch.set_num_threads(t_default)
    faiss.omp_set_num_threads(f_default)
    # PROPOSED FIX, measured here only: FAISS scans the index once per query below 20 queries
    # (distance_compute_blas_threshold); the service's batches are smaller, so a flat batch of 8 streams it 8 times
    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1
    try:
        fn = searchers["faiss-flat"]
        for q in q1[:5]:
            fn(q)
        res["faiss-flat@blas_threshold=1"] = {"search_1_p50_ms": statistics.median(time_calls(fn, q1[:100])),
                                              "search_8_p50_ms": statistics.median(time_calls(fn, q8))}
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved
    # recall / speed of HNSW at each efSearch, on the same queries build_faiss tuned with
    _, exact = indexes["flat"].search(qv, 10)
    res["hnsw_curve"] = {}
    for kind in kinds:
        if not kind.startswith("hnsw"):
            continue
        hnsw, curve = indexes[kind], []
        for ef in ladders[kind]:
            set_knob(hnsw, "hnsw", ef)
            t = time_calls(lambda q: hnsw.search(q, 10), q1[:100])
            curve.append({"ef_search": ef, "recall@10": round(recall_at_10(hnsw, exact, qv), 4),
                          "search_1_p50_ms": round(statistics.median(t), 3)})
        res["hnsw_curve"][kind] = curve
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=DEFAULT_RUN, help="the run whose text tower encodes queries (and fixes E)")
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--work", default="/tmp/polyalign-bench-search", help="where the index folders go")
    ap.add_argument("--manifest", default=str(REPO / "data" / "emoji4" / "all.jsonl"), help="captions for queries")
    ap.add_argument("--clusters", type=int, default=1024)
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=65536)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=4.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--duration-1", type=float, default=10.0, help="seconds for the 1-client row")
    ap.add_argument("--variants", default="default,threads1",
                    help="default: the service as shipped; threads1: OMP_NUM_THREADS=1 (proposed fix)")
    ap.add_argument("--hnsw-extra", default="", help="extra HNSW builds M:efC[:efSearch max],... (other build "
                    "parameters, a longer monkeypatched EF_SEARCH ladder; labelled), served next to the default one")
    args = ap.parse_args()

    import torch

    from polyalign import load

    run = Path(args.run).absolute()
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"{run} is not a run (no config.yaml): pass --run")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"command": " ".join([".venv/bin/python", "benchmarks/bench_search.py", *sys.argv[1:]]),
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                      f"({torch.get_num_threads()} threads)", "load_start": load_avg(), "run": str(run),
           "clients": args.clients, "warmup": args.warmup, "duration": args.duration,
           "variants": args.variants.split(","), "sizes": {}}
    import faiss

    res["machine"] += f", faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads)"
    dim = run_embed_dim(run)
    enc = load(run, "auto", "cpu")
    res["dim"], res["model"] = dim, repr(enc)
    texts = captions(Path(args.manifest))
    random.Random(args.seed).shuffle(texts)
    centre_names = texts[: args.clusters]
    recall_names = texts[args.clusters : args.clusters + args.recall_queries]
    tag = f"{run.name}-{hashlib.sha1(str(run).encode()).hexdigest()[:8]}"
    centres = encode_cached(enc, centre_names, work / f"centres-{tag}-{args.clusters}.npy")
    rq = encode_cached(enc, recall_names, work / f"recallq-{tag}-{args.recall_queries}.npy")
    assert centres.shape[1] == dim, (centres.shape, dim)
    res["items_desc"] = (f"{args.clusters} cluster centres = the run's text embeddings of distinct emoji captions; "
                         f"item = centre (Zipf weights 1/(rank+10)) + anisotropic Gaussian noise (std_i ∝ (i+1)^-0.75, "
                         f"random rotation, norm {args.noise}), re-normalised; seed {args.seed}")
    res["queries_desc"] = (f"{len(texts)} distinct captions of {Path(args.manifest).name} (random per client); "
                           f"recall queries = text embeddings of {len(recall_names)} captions not used as centres")
    log(f"load {load_avg()}; E={dim}; encoding components")
    res["encode"] = components_encode(enc, texts)
    log(f"encode: {res['encode']}")

    for n in [int(x) for x in args.sizes.split(",")]:
        base = work / f"n{n}"
        built = write_index(base, n, centres, centre_names, rq, args, run, enc.step, repr(enc))
        emb = built.pop("emb")
        kinds = list(built["builds"])
        s = {**built, "components": components_search(base, emb, rq, kinds), "serve": []}
        del emb
        log(f"{n}: components {json.dumps({k: v for k, v in s['components'].items() if k != 'hnsw_curve'})}")
        res["sizes"][str(n)] = s
        for variant in res["variants"]:
            env = {} if variant == "default" else {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            for name, kind, backend in backends(kinds):
                logf = work / f"serve-{n}-{name}-{variant}.log"
                proc, port, start_s, health = start_server(base / kind, backend, env, logf)
                try:
                    rss = rss_mb(proc.pid)
                    for clients, dur in ((1, args.duration_1), (args.clients, args.duration)):
                        r = load_test(port, texts, clients, args.warmup, dur, args.seed)
                        r |= {"backend": name, "variant": variant, "rss_mb": rss, "start_s": round(start_s, 1),
                              "health": health}
                        s["serve"].append(r)
                        log(f"{n} {name} {variant} {clients} clients: p50 {r['p50_ms']:.1f} ms p99 "
                            f"{r['p99_ms']:.1f} ms {r['qps']:.1f} q/s (took p50 {r['server_took_p50_ms']:.1f}; "
                            f"errors {r['errors']}; load {r['load']})")
                finally:
                    stop_server(proc)
        res["load_end"] = load_avg()
        res["targets"] = targets(res)
        write_report(res)  # after each size: a partial report survives a later failure
    log("\n".join(res["targets"]))
    log(f"wrote {RESULTS / 'search.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
