"""The report of benchmarks/bench_search.py: benchmarks/results/search.md and search.json, and the targets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

def backends(kinds) -> list[tuple[str, str, str]]:
    """(name, index folder, --backend) of every served backend: each FAISS kind, and torch top-k over flat's folder."""
    return [(f"faiss-{k}", k, "faiss") for k in kinds] + [("torch-topk", "flat", "torch")]


def fmt(x, nd=1) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def write_report(res: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search.json").write_text(json.dumps(res, indent=2, default=float))
    L = ["# Search service benchmark (`polyalign serve`)", "",
         f"- command: `{res['command']}`", f"- date: {res['date']}; host: {res['machine']}",
         f"- run (text tower encoding the queries): `{res['run']}` (E = {res['dim']}; {res['model']})",
         f"- load average at start / end: {res['load_start']} / {res.get('load_end', '?')} "
         f"(a shared, noisy machine: compare rows of one run, not across runs)",
         f"- items: {res['items_desc']}", f"- HTTP queries: {res['queries_desc']}",
         f"- load: {res['clients']} concurrent keep-alive clients (http.client threads, same machine) and 1 sequential "
         f"client; {res['warmup']} s warm-up, then {res['duration']} s measured per row; k = 10. "
         "End-to-end = client-measured request latency (encode + queue + search + JSON).", ""]
    L += ["## End to end", "",
          "| size | backend | threads | clients | p50 ms | p99 ms | qps | server took p50 ms | search only 1q p50 ms (in-process) "
          "| HNSW recall@10 (efSearch) | speed-up over exact (search only / e2e p50) | server RSS MB | start s |",
          "|---:|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for size, s in res["sizes"].items():
        comp = s["components"]
        for row in s["serve"]:
            ex = next((r for r in s["serve"] if r["backend"] == "faiss-flat" and r["variant"] == row["variant"]
                       and r["clients"] == row["clients"]), None)
            sfx = "@threads1" if row["variant"] == "threads1" else ""  # the in-process time under the same threads
            srch = comp[row["backend"] + sfx]["search_1_p50_ms"]
            rec = s["builds"].get(row["backend"].removeprefix("faiss-"), {})
            rec_s = f"{rec['recall@10']:.3f} ({rec['ef_search']})" if "recall@10" in rec else "–"
            speed = (f"{comp['faiss-flat' + sfx]['search_1_p50_ms'] / srch:.1f}× / {ex['p50_ms'] / row['p50_ms']:.2f}×"
                     if ex and row["backend"] != "faiss-flat" else "1×")
            L.append(f"| {int(size):,} | {row['backend']} | {row['variant']} | {row['clients']} | {fmt(row['p50_ms'])} "
                     f"| {fmt(row['p99_ms'])} | {fmt(row['qps'])} | {fmt(row['server_took_p50_ms'])} | {fmt(srch, 2)} "
                     f"| {rec_s} | {speed} "
                     f"| {fmt(row['rss_mb'], 0)} | {fmt(row['start_s'])} |")
    L += ["", "## Where the time goes (in-process, one query)", ""]
    enc = res["encode"]
    for k, v in enc.items():
        if isinstance(v, dict):
            L.append(f"- text encode, torch {k}: 1 query p50 {v['encode_1_p50_ms']:.1f} ms (p90 {v['encode_1_p90_ms']:.1f}); "
                     f"a batch of 8 p50 {v['encode_8_p50_ms']:.1f} ms")
    L.append(f"- `inference(model)` enter (model.eval() over every module + no_grad), paid per encode call: "
             f"{enc['inference_ctx_enter_p50_ms']:.2f} ms")
    L += ["", "| size | backend | search 1 query p50 ms | p99 ms | batch of 8 p50 ms |", "|---:|---|---:|---:|---:|"]
    for size, s in res["sizes"].items():
        for b, _, _ in backends(s["builds"]):
            for suffix, label in (("", "default threads"), ("@threads1", "1 thread")):
                c = s["components"][b + suffix]
                L.append(f"| {int(size):,} | {b} ({label}) | {c['search_1_p50_ms']:.2f} | {c['search_1_p99_ms']:.2f} "
                         f"| {c['search_8_p50_ms']:.2f} |")
    for size, s in res["sizes"].items():
        c = s["components"]["faiss-flat@blas_threshold=1"]
        L.append(f"| {int(size):,} | faiss-flat (default threads, faiss.cvar.distance_compute_blas_threshold"
                 f" = 1, as read_index sets it) | {c['search_1_p50_ms']:.2f} | – | {c['search_8_p50_ms']:.2f} |")
    L += ["", "HNSW recall@10 vs exact / one-query search time (1 query, default threads) by efSearch, on the ~1000 "
          "recall queries:", ""]
    for size, s in res["sizes"].items():
        for kind, curve in s["components"]["hnsw_curve"].items():
            L.append(f"- {int(size):,}, {kind}: " + "; ".join(
                f"ef {c['ef_search']}: {c['recall@10']:.3f} / {c['search_1_p50_ms']:.2f} ms" for c in curve))
    L += ["", "## Builds", "", "| size | generate+write s | flat build s | HNSW build s | HNSW build+tune s | HNSW params "
          "| efSearch | recall@10 | load |", "|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for size, s in res["sizes"].items():
        f = s["builds"]["flat"]
        for kind, h in s["builds"].items():
            if not kind.startswith("hnsw"):
                continue
            params = h.get("monkeypatched") or _make_index_defaults()
            L.append(f"| {int(size):,} | {s['generate_s']:.1f} | {f['build_s']:.2f} | {h['build_s']:.1f} "
                     f"| {h['build_and_tune_s']:.1f} | M={params['hnsw_m']}, efC={params['ef_construction']}, efSearch "
                     f"ladder ≤ {h['ladder'][-1]}{' (MONKEYPATCHED)' if 'monkeypatched' in h else ' (defaults)'} "
                     f"| {h['ef_search']} | {h['recall@10']:.4f} | {h['load']} |")
    L += ["", "## Targets", ""] + [f"- {t}" for t in res["targets"]]
    (RESULTS / "search.md").write_text("\n".join(L) + "\n")


def targets(res: dict) -> list[str]:
    out = []
    big = str(max(int(s) for s in res["sizes"]))
    s = res["sizes"][big]
    for variant in res["variants"]:
        for clients in (1, res["clients"]):
            rows = [r for r in s["serve"] if r["variant"] == variant and r["clients"] == clients]
            if rows:
                best = min(rows, key=lambda r: r["p50_ms"])
                hs = "; ".join(f"{r['backend']} p50 {r['p50_ms']:.1f} ms" for r in rows)
                out.append(f"{int(big):,} items, end-to-end text query p50 ≤ 50 ms, threads={variant}, {clients} "
                           f"client(s): {'MET' if best['p50_ms'] <= 50 else 'NOT MET'} by the best backend "
                           f"({best['backend']}) ({hs})")
    for size, s in res["sizes"].items():
        c = s["components"]
        for kind, h in s["builds"].items():
            if not kind.startswith("hnsw"):
                continue
            b = f"faiss-{kind}"
            out.append(f"{int(size):,} items, {kind}{' (monkeypatched params)' if 'monkeypatched' in h else ''}: "
                       f"recall@10 ≥ 0.95: {'MET' if h['recall@10'] >= 0.95 else 'NOT MET'} ({h['recall@10']:.4f} at "
                       f"efSearch {h['ef_search']}); one-query search "
                       f"{c['faiss-flat']['search_1_p50_ms'] / c[b]['search_1_p50_ms']:.1f}× faster than exact "
                       f"({c[b]['search_1_p50_ms']:.2f} vs {c['faiss-flat']['search_1_p50_ms']:.2f} ms, default threads; "
                       f"1 thread: {c['faiss-flat@threads1']['search_1_p50_ms'] / c[b + '@threads1']['search_1_p50_ms']:.1f}×)")
    return out


def _make_index_defaults() -> dict:
    """make_index's HNSW parameters as shipped."""
    import inspect

    from polyalign.serve.faiss_index import make_index

    sig = inspect.signature(make_index).parameters
    return {"hnsw_m": sig["hnsw_m"].default, "ef_construction": sig["ef_construction"].default}
