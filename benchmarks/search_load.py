"""The service under load for benchmarks/bench_search.py: start ``polyalign serve`` as a subprocess, drive it with
keep-alive HTTP clients, read its memory."""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

from timing import load_avg

REPO = Path(__file__).resolve().parents[1]


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def start_server(idx: Path, backend: str, env_extra: dict, logf: Path, timeout: float = 900):
    port = free_port()
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, "-m", "polyalign", "serve", str(idx), "--host", "127.0.0.1", "--port", str(port),
           "--backend", backend]
    out = open(logf, "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {logf}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/healthz")
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status == 200:
                return proc, port, time.perf_counter() - t0, json.loads(body)
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not answer /healthz in {timeout} s; see {logf}")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load_test(port: int, texts: list[str], clients: int, warmup: float, duration: float, seed: int) -> dict:
    start = time.perf_counter()
    warm_until, stop_at = start + warmup, start + warmup + duration
    lat, took, errors, lock = [], [], [0], threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine, mine_took, bad = [], [], 0
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                break
            q = urllib.parse.urlencode({"text": rng.choice(texts), "k": 10})
            t0 = time.perf_counter()
            try:
                conn.request("GET", f"/search?{q}")
                r = conn.getresponse()
                body = r.read()
            except (OSError, http.client.HTTPException):
                bad += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            t1 = time.perf_counter()
            if r.status != 200:
                bad += 1
                continue
            if t0 >= warm_until and t1 <= stop_at:
                mine.append((t1 - t0) * 1000)
                mine_took.append(json.loads(body)["took_ms"])
        conn.close()
        with lock:
            lat.extend(mine)
            took.extend(mine_took)
            errors[0] += bad

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": clients, "requests": len(lat), "errors": errors[0], "p50_ms": pct(lat, 50),
            "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99), "qps": len(lat) / duration,
            "server_took_p50_ms": pct(took, 50), "duration_s": duration, "load": load_avg()}
