#!/usr/bin/env python3
"""HTTP benchmark for any CyborgDB-compatible server (ours or the original).

Generates seeded clustered data and held-out queries, drives BASE_URL over HTTP and prints one
JSON line per scenario: upsert vectors/s (JSON and binary, batches of 1000), explicit train
seconds, single-query p50/p99 and sequential QPS, 4-client concurrent QPS, batch-100 query QPS,
recall@10 against exact search, and the server's peak RSS (with --pid).

Request bodies are encoded before the clock starts and connections are kept alive, so the
client measures the server, not Python's JSON encoder.

    bench.py --url http://127.0.0.1:8000 --scenario 100k-128 [--api-key K] [--pid PID]

The 10m-128 scenario (10M vectors, generated in chunks, with restarts for cold queries) is
`tests/bench/big.py`, which runs its own server.
"""
import argparse
import base64
import http.client
import json
import multiprocessing as mp
import os
import secrets
import sys
import time
import urllib.parse

import numpy as np

SCENARIOS = {
    # name: (n, dim, metric, precision, centre scale)
    "100k-128": (100_000, 128, "euclidean", "float32", 3.0),
    "20k-384": (20_000, 384, "euclidean", "float32", 3.0),
    "20k-384-cos-f16": (20_000, 384, "cosine", "float16", 3.0),
    "hard-100k-128": (100_000, 128, "euclidean", "float32", 0.5),
    "1m-128": (1_000_000, 128, "euclidean", "float32", 3.0),
    "10k-128": (10_000, 128, "euclidean", "float32", 3.0),
}
N_CLUSTERS = 256
N_QUERIES = 500


def make_data(n, dim, scale, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, scale, (N_CLUSTERS, dim)).astype(np.float32)
    x = centres[rng.integers(0, N_CLUSTERS, n)] + rng.normal(0.0, 1.0, (n, dim)).astype(np.float32)
    q = centres[rng.integers(0, N_CLUSTERS, N_QUERIES)] + rng.normal(0.0, 1.0, (N_QUERIES, dim)).astype(np.float32)
    return x.astype(np.float32), q.astype(np.float32)


def exact_top10(x, q, metric):
    out = np.empty((len(q), 10), dtype=np.int64)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
    xx = (x.astype(np.float64) ** 2).sum(1)
    for s in range(0, len(q), 50):
        qs = q[s:s + 50].astype(np.float64)
        d = xx[None, :] - 2.0 * qs @ x.T.astype(np.float64)
        out[s:s + 50] = np.argsort(d, axis=1)[:, :10]
    return out


class Conn:
    def __init__(self, url, api_key):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 80
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self.headers["X-API-Key"] = api_key
        self.c = http.client.HTTPConnection(self.host, self.port, timeout=3600)

    def post(self, path, body: bytes):
        for attempt in range(2):
            try:
                self.c.request("POST", path, body=body, headers=self.headers)
                r = self.c.getresponse()
                data = r.read()
                break
            except (http.client.HTTPException, ConnectionError):
                if attempt:
                    raise
                self.c.close()
                self.c = http.client.HTTPConnection(self.host, self.port, timeout=3600)
        if r.status != 200:
            raise RuntimeError(f"POST {path} -> {r.status}: {data[:300]!r}")
        return json.loads(data) if data else None


def enc(obj):
    return json.dumps(obj).encode()


def b64(a):
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode()


def ids_of(results):
    return [r["id"] for r in results]


def single_query_bodies(name, key, q, n_probes=None):
    out = []
    for v in q:
        body = {"index_name": name, "index_key": key, "query_vectors": v.tolist(), "top_k": 10}
        if n_probes:
            body["n_probes"] = n_probes
        out.append(enc(body))
    return out


def run_singles(conn, bodies):
    lat, found = [], []
    t0 = time.perf_counter()
    for b in bodies:
        s = time.perf_counter()
        r = conn.post("/v1/vectors/query", b)
        lat.append(time.perf_counter() - s)
        res = r["results"]
        if res and isinstance(res[0], list):
            res = res[0]
        found.append([int(i) for i in ids_of(res)])
    total = time.perf_counter() - t0
    return np.array(lat), found, len(bodies) / total


def _worker(args):
    url, api_key, bodies, barrier = args
    conn = Conn(url, api_key)
    conn.post("/v1/vectors/query", bodies[0])  # warm the connection
    barrier.wait()
    start = time.monotonic()
    for b in bodies:
        conn.post("/v1/vectors/query", b)
    return start, time.monotonic()


def run_concurrent(url, api_key, bodies, clients=4, rounds=4):
    """QPS of `clients` processes sending `rounds` passes over `bodies` between them.

    The clock runs from the first client's start (after all of them have connected and met at
    a barrier) to the last client's finish, read from the system-wide monotonic clock, so
    process start-up, pickling and connection set-up are not counted."""
    work = bodies * rounds
    per = [work[i::clients] for i in range(clients)]
    with mp.Manager() as m:
        barrier = m.Barrier(clients)
        with mp.Pool(clients) as pool:
            spans = pool.map(_worker, [(url, api_key, p, barrier) for p in per])
    total = max(e for _, e in spans) - min(s for s, _ in spans)
    return len(work) / total


def recall(found, truth):
    hits = sum(len(set(f[:10]) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / (len(truth) * 10)


def peak_rss_mb(pid):
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


def bench(args, scen):
    n, dim, metric, precision, scale = SCENARIOS[scen]
    x, q = make_data(n, dim, scale, args.seed)
    truth = exact_top10(x, q, metric)
    conn = Conn(args.url, args.api_key)
    key = secrets.token_hex(32)
    tag = secrets.token_hex(3)
    out = {"scenario": scen, "server": args.label or args.url, "n": n, "dim": dim, "metric": metric,
           "precision": precision}
    ids = [str(i) for i in range(n)]

    # JSON upsert into a scratch index (up to 20k vectors).
    scratch = f"bench-json-{tag}"
    conn.post("/v1/indexes/create", enc({"index_name": scratch, "index_key": key, "dimension": dim,
                                         "metric": metric, "storage_precision": precision}))
    m = min(n, 20_000)
    bodies = [enc({"index_name": scratch, "index_key": key, "items": [
        {"id": ids[i], "vector": x[i].tolist()} for i in range(s, min(s + 1000, m))]}) for s in range(0, m, 1000)]
    t0 = time.perf_counter()
    for b in bodies:
        conn.post("/v1/vectors/upsert", b)
    out["upsert_json_vps"] = m / (time.perf_counter() - t0)
    del bodies
    conn.post("/v1/indexes/delete", enc({"index_name": scratch, "index_key": key}))

    # Binary upsert of everything into the main index.
    name = f"bench-{tag}"
    conn.post("/v1/indexes/create", enc({"index_name": name, "index_key": key, "dimension": dim,
                                         "metric": metric, "storage_precision": precision}))
    bodies = [enc({"index_name": name, "index_key": key, "batch": {
        "ids": ids[s:s + 1000], "vectors_b64": b64(x[s:s + 1000]), "dimension": dim}}) for s in range(0, n, 1000)]
    t0 = time.perf_counter()
    for b in bodies:
        conn.post("/v1/vectors/upsert_binary", b)
    out["upsert_binary_vps"] = n / (time.perf_counter() - t0)
    del bodies

    t0 = time.perf_counter()
    conn.post("/v1/indexes/train", enc({"index_name": name, "index_key": key}))
    out["train_s"] = time.perf_counter() - t0
    info = conn.post("/v1/indexes/describe", enc({"index_name": name, "index_key": key}))
    out["n_lists"] = info.get("n_lists")
    out["is_trained"] = info.get("is_trained")

    bodies = single_query_bodies(name, key, q)
    run_singles(conn, bodies[:20])  # warm-up
    lat, found, qps = run_singles(conn, bodies)
    out["single_p50_ms"] = float(np.percentile(lat, 50) * 1e3)
    out["single_p99_ms"] = float(np.percentile(lat, 99) * 1e3)
    out["single_qps"] = qps
    out["recall_at_10"] = recall(found, truth)
    out["concurrent4_qps"] = run_concurrent(args.url, args.api_key, bodies)

    batch_bodies = [enc({"index_name": name, "index_key": key, "top_k": 10,
                         "batch": {"vectors_b64": b64(q[s:s + 100]), "dimension": dim}})
                    for s in range(0, len(q), 100)]
    conn.post("/v1/vectors/query_binary", batch_bodies[0])
    t0 = time.perf_counter()
    bfound = []
    for b in batch_bodies:
        r = conn.post("/v1/vectors/query_binary", b)
        bfound += [[int(i) for i in ids_of(row)] for row in r["results"]]
    out["batch100_qps"] = len(q) / (time.perf_counter() - t0)
    out["batch_recall_at_10"] = recall(bfound, truth)

    if args.sweep_probes:
        sweep = []
        for p in [int(v) for v in args.sweep_probes.split(",")]:
            lat, found, qps = run_singles(conn, single_query_bodies(name, key, q, n_probes=p))
            sweep.append({"n_probes": p, "recall_at_10": recall(found, truth),
                          "p50_ms": float(np.percentile(lat, 50) * 1e3), "qps": qps})
        out["probe_sweep"] = sweep
    out["peak_rss_mb"] = peak_rss_mb(args.pid)
    if not args.keep:
        conn.post("/v1/indexes/delete", enc({"index_name": name, "index_key": key}))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--api-key")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--pid", type=int, help="server process id, for peak RSS")
    ap.add_argument("--label")
    ap.add_argument("--sweep-probes", help="comma-separated n_probes values to sweep")
    ap.add_argument("--keep", action="store_true", help="keep the benchmark index")
    args = ap.parse_args()
    for scen in args.scenario:
        print(json.dumps(bench(args, scen)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
