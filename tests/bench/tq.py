"""Side-by-side benchmark of the storage precisions (float32, float16, tq12, tq8, tq6, tq4)
on SealDB and on the original cyborgdb-service 0.18.0: same data (clustered float32), same
client, one run. Per precision and server: relative error of the vectors `get` returns,
recall@10 of queries against the exact float32 neighbours, single-query p50 (untrained
index: every vector is scanned, so this is the precision's own cost), and the data
directory's size after the upsert (and, for SealDB, the bytes of its records, from a run on
the filesystem store: the redb file grows in allocation steps), the server's resident memory
after the queries (VmRSS), and for SealDB the block cache's bytes then (every block was
scanned, so the cache holds the whole index decrypted: memory per vector by tier).

Usage: python tests/bench/tq.py --bin target/release/sealdb [--n 20000] [--dim 128] [--cache-mb MB]
       [--ours-only]
"""
import json
import sys
import urllib.request
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import enc  # noqa: E402
from text import LAUNCH, ROOT_KEY, bench_args, start  # noqa: E402

SPARE = "wal-spare.log"
PRECISIONS = ["float32", "float16", "tq12", "tq8", "tq6", "tq4"]


def du(path):
    """Allocated bytes under `path` after the server stopped, less our write-ahead log's
    preallocated spare segment (empty by construction)."""
    return sum(f.stat().st_blocks * 512 for f in Path(path).rglob("*")
               if f.is_file() and f.name != SPARE and f.name != "server.log")


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def cache_mb(port):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"X-API-Key": ROOT_KEY})
    for line in urllib.request.urlopen(req, timeout=10).read().decode().splitlines():
        if line.startswith("sealdb_block_cache_bytes "):
            return round(float(line.split()[1]) / 1e6, 2)
    return None


def upsert(conn, prec, args, data):
    base = {"index_name": "tq-bench", "index_key": "33" * 32}
    conn.post("/v1/indexes/create", enc({**base, "dimension": args.dim, "storage_precision": prec}))
    for s in range(0, len(data), 1000):
        items = [{"id": str(i), "vector": data[i].tolist()} for i in range(s, min(s + 1000, len(data)))]
        conn.post("/v1/vectors/upsert", enc({**base, "items": items}))
    return base


def run(label, cmd, port, args, data, queries, exact):
    rows = []
    # Our server's cache budget (--cache-mb): under a budget the decoded index would fill
    # more than half of, float16 and tq blocks stay packed in the cache.
    env = {"SEALDB_INDEX_CACHE_MB": str(args.cache_mb)} if label == "sealdb" and args.cache_mb else None
    for prec in PRECISIONS:
        with tempfile.TemporaryDirectory() as d:
            p, conn = start(cmd, port, d, env)
            try:
                base = upsert(conn, prec, args, data)
                before = 0
                ids = [str(i) for i in range(0, len(data), 7)]
                got = conn.post("/v1/vectors/get", enc({**base, "ids": ids, "include": ["vector"]}))["results"]
                g = np.array([r["vector"] for r in sorted(got, key=lambda r: int(r["id"]))])
                ref = data[::7]
                rel = float(np.sqrt(((g - ref) ** 2).sum() / (ref ** 2).sum()))
                lat, hits = [], 0
                for q, want in zip(queries, exact):
                    b = enc({**base, "query_vectors": q.tolist(), "top_k": 10})
                    t = time.perf_counter()
                    r = conn.post("/v1/vectors/query", b)
                    lat.append(time.perf_counter() - t)
                    hits += len({int(x["id"]) for x in r["results"]} & set(want.tolist()))
                row = {"label": label, "precision": prec, "rel_error": round(rel, 5),
                       "recall10": round(hits / (10 * len(queries)), 4),
                       "p50_ms": round(float(np.percentile(np.array(lat) * 1000, 50)), 3),
                       "rss_mb": rss_mb(p.pid)}
                if label == "sealdb":
                    row["cache_mb"] = cache_mb(port)
            finally:
                p.terminate()
                p.wait(timeout=30)
            row["data_mb"] = round((du(d) - before) / 1e6, 2)
        if label == "sealdb":
            # The redb file grows in allocation regions, so its size moves in steps; the
            # filesystem store keeps one file per record: the bytes the index really stores.
            with tempfile.TemporaryDirectory() as d:
                p, conn = start(cmd, port, d, {"CYBORGDB_DB_TYPE": "filesystem"})
                try:
                    upsert(conn, prec, args, data)
                finally:
                    p.terminate()
                    p.wait(timeout=30)
                row["records_mb"] = round(sum(f.stat().st_size for f in Path(d).rglob("*")
                                              if f.is_file() and f.name != "server.log") / 1e6, 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    ap = bench_args(100)
    ap.add_argument("--cache-mb", type=int, default=None, help="our --index-cache-mb (default: the server's)")
    ap.add_argument("--ours-only", action="store_true", help="skip the original (its columns repeat ours' shape)")
    args = ap.parse_args()
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((64, args.dim)).astype(np.float32) * 3
    data = (centers[rng.integers(0, 64, args.n)] + rng.standard_normal((args.n, args.dim))).astype(np.float32)
    queries = (centers[rng.integers(0, 64, args.queries)] + rng.standard_normal((args.queries, args.dim))).astype(np.float32)
    d2 = (queries ** 2).sum(1)[:, None] + (data ** 2).sum(1)[None] - 2 * queries @ data.T
    exact = np.argsort(d2, axis=1)[:, :10]
    ours = run("sealdb", [args.bin], 18821, args, data, queries, exact)
    theirs = ours if args.ours_only else run("original", [args.original_python, str(LAUNCH)], 18822, args, data,
                                              queries, exact)
    print(f"\n{'precision':10} {'rel err ours/orig':>22} {'recall@10 ours/orig':>22} {'p50 ms ours/orig':>20} "
          f"{'data MB ours/orig':>20} {'records MB ours':>16} {'cache MB ours':>14} {'RSS MB ours/orig':>18}")
    for a, b in zip(ours, theirs):
        print(f"{a['precision']:10} {a['rel_error']:>10} / {b['rel_error']:<10} {a['recall10']:>10} / {b['recall10']:<10} "
              f"{a['p50_ms']:>8} / {b['p50_ms']:<8} {a['data_mb']:>8} / {b['data_mb']:<8} {a['records_mb']:>10} "
              f"{a['cache_mb']:>14} {a['rss_mb']:>8} / {b['rss_mb']:<8}")
    if args.out:
        with open(args.out, "a") as f:
            for r in ours + ([] if args.ours_only else theirs):
                f.write(json.dumps({**r, "n": args.n, "dim": args.dim}) + "\n")


if __name__ == "__main__":
    main()
