"""Side-by-side benchmark of the 0.18 query paths: query_metadata (filter only and BM25
text) and hybrid query, on SealDB and on the original cyborgdb-service 0.18.0, same data,
same client, one run. Latency is measured client-side with pre-encoded bodies over one
keep-alive connection (as bench.py does); the results of both servers are also compared
(top ids of the text queries), so a fast wrong answer does not pass as a win.

Usage: python tests/bench/text.py --bin target/release/sealdb [--n 20000] [--queries 200]
       (the original is started from the venv given by --original-python)
Output: one JSON line per server and a ratio table.
"""
import argparse
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Conn, enc  # noqa: E402

LAUNCH = Path(__file__).resolve().parent / "launch_original.py"
ROOT_KEY = "bench-text-root-key-" + secrets.token_hex(8)


def vocabulary(size, seed):
    rnd = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = set()
    while len(words) < size:
        words.add("".join(rnd.choice(letters) for _ in range(rnd.randint(3, 9))))
    return sorted(words)


def make_docs(n, dim, seed, text=True):
    rnd = random.Random(seed)
    words = vocabulary(5000, seed)
    # Zipf-like word frequencies: a few common words, a long tail.
    weights = [1.0 / (r + 1) for r in range(len(words))]
    vecs = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    docs = []
    for i in range(n):
        meta = {"cat": i % 1000, "group": i % 10}
        if text:
            meta["title"] = " ".join(rnd.choices(words, weights, k=rnd.randint(3, 8)))
            meta["body"] = " ".join(rnd.choices(words, weights, k=rnd.randint(20, 60)))
        docs.append(meta)
    return (vecs, docs), words, weights


def start(cmd, port, data, env_extra=None):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": data, "TMPDIR": data,
           "PORT": str(port), "CYBORGDB_DB_TYPE": "disk", "CYBORGDB_DISK_PATH": f"{data}/db",
           "CYBORGDB_SERVICE_ROOT_KEY": ROOT_KEY, "AUTO_TRAIN_DISABLED": "true", **(env_extra or {})}
    log = open(f"{data}/server.log", "wb")
    p = subprocess.Popen(cmd, env=env, cwd=data, stdout=log, stderr=subprocess.STDOUT)
    conn = None
    for _ in range(600):
        try:
            conn = Conn(f"http://127.0.0.1:{port}", ROOT_KEY)
            conn.c.request("GET", "/v1/health")
            if conn.c.getresponse().status == 200:
                return p, Conn(f"http://127.0.0.1:{port}", ROOT_KEY)
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server {cmd} did not start")


def timed(conn, path, bodies):
    lat, out = [], []
    for b in bodies:
        s = time.perf_counter()
        r = conn.post(path, b)
        lat.append(time.perf_counter() - s)
        out.append(r)
    lat = np.array(lat) * 1000
    return {"p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3)}, out


def run(label, conn, docs, args, words, weights):
    name, key = "text-bench", "22" * 32
    create = {"index_name": name, "index_key": key, "dimension": args.dim,
              "metadata_schema": {"cat": {"filterable": True}}}
    if not args.no_text:
        create["text_fields"] = ["title", "body"]
    conn.post("/v1/indexes/create", enc(create))
    vecs, metas = docs
    upsert_s = 0.0
    for s in range(0, len(metas), 500):
        items = [{"id": str(i), "vector": vecs[i].tolist(), "metadata": metas[i]}
                 for i in range(s, min(s + 500, len(metas)))]
        body = enc({"index_name": name, "index_key": key, "items": items})
        t0 = time.perf_counter()
        conn.post("/v1/vectors/upsert", body)
        upsert_s += time.perf_counter() - t0
    rnd = random.Random(args.seed + 1)
    texts = [" ".join(rnd.choices(words[:2000], weights[:2000], k=rnd.randint(1, 3))) for _ in range(args.queries)]
    qv = np.random.default_rng(args.seed + 2).standard_normal((args.queries, args.dim)).astype(np.float32)
    base = {"index_name": name, "index_key": key}
    res = {"label": label, "n": len(metas), "upsert_docs_per_s": round(len(metas) / upsert_s)}
    bodies = [enc({**base, "filters": {"cat": rnd.randrange(1000)}, "top_k": 10}) for _ in range(args.queries)]
    res["query_metadata_filter"], _ = timed(conn, "/v1/vectors/query_metadata", bodies)
    bodies = [enc({**base, "query_vectors": v.tolist(), "top_k": 10, "filters": {"cat": rnd.randrange(1000)}})
              for v in qv]
    res["filtered_vector_query"], _ = timed(conn, "/v1/vectors/query", bodies)
    text_out = hybrid_out = []
    if not args.no_text:
        bodies = [enc({**base, "text": t, "top_k": 10}) for t in texts]
        res["query_metadata_text"], text_out = timed(conn, "/v1/vectors/query_metadata", bodies)
        bodies = [enc({**base, "query_vectors": v.tolist(), "top_k": 10, "text": t}) for v, t in zip(qv, texts)]
        res["hybrid_query"], hybrid_out = timed(conn, "/v1/vectors/query", bodies)
    bodies = [enc({**base, "query_vectors": v.tolist(), "top_k": 10}) for v in qv]
    res["vector_query"], _ = timed(conn, "/v1/vectors/query", bodies)
    top = [[r["id"] for r in o["results"][:3]] for o in text_out]
    hyb = [[r["id"] for r in o["results"][:3]] for o in hybrid_out]
    return res, top, hyb


def bench_args(queries):
    """The arguments every side-by-side bench here takes."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="our server binary (a release build)")
    ap.add_argument("--original-python", default=str(Path(__file__).resolve().parents[2] / ".venvs/service18/bin/python"))
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=queries)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--no-text", action="store_true", help="no full_text fields (vectors and the value index only)")
    return ap


def main():
    args = bench_args(200).parse_args()
    docs, words, weights = make_docs(args.n, args.dim, args.seed, text=not args.no_text)
    rows, tops = [], []
    for label, cmd, port in [("sealdb", [args.bin], 18811), ("original", [args.original_python, str(LAUNCH)], 18812)]:
        with tempfile.TemporaryDirectory() as data:
            p, conn = start(cmd, port, data)
            try:
                res, top, hyb = run(label, conn, docs, args, words, weights)
            finally:
                p.terminate()
                p.wait(timeout=30)
        rows.append(res)
        tops.append((top, hyb))
        print(json.dumps(res), flush=True)
    def agree(a, b):
        return float(np.mean([x == y for x, y in zip(a, b)])) if a else float("nan")
    same_text = agree(tops[0][0], tops[1][0])
    same_hybrid = agree(tops[0][1], tops[1][1])
    print(f"\nsame top-3 ids: text {same_text:.2f}, hybrid {same_hybrid:.2f} (ties may reorder)")
    ours, theirs = rows
    print(f"{'metric':28} {'sealdb':>10} {'original':>10} {'ratio':>8}")
    print(f"{'upsert docs/s':28} {ours['upsert_docs_per_s']:>10} {theirs['upsert_docs_per_s']:>10} "
          f"{ours['upsert_docs_per_s'] / theirs['upsert_docs_per_s']:>7.2f}x")
    for k in ["query_metadata_filter", "filtered_vector_query", "query_metadata_text", "hybrid_query", "vector_query"]:
        if k not in ours:
            continue
        for q in ["p50_ms", "p99_ms"]:
            a, b = ours[k][q], theirs[k][q]
            print(f"{k + ' ' + q:28} {a:>10} {b:>10} {b / a:>7.2f}x faster")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "same_top3_text": same_text, "same_top3_hybrid": same_hybrid}) + "\n")


if __name__ == "__main__":
    main()
