#!/usr/bin/env python3
"""Our engine vs FAISS IndexIVFFlat: same data, same n_lists and n_probes, single thread,
time per query. Needs `pip install faiss-cpu numpy`.

    tests/bench/faiss_compare.py [--n 100000] [--dim 128] [--n-lists 256] [--n-probes 1,4,16,64]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench import make_data  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--scale", type=float, default=3.0)
    ap.add_argument("--n-lists", type=int, default=256)
    ap.add_argument("--n-probes", default="1,4,16,64")
    args = ap.parse_args()
    import faiss
    faiss.omp_set_num_threads(1)
    x, q = make_data(args.n, args.dim, args.scale, 42)
    probes = [int(p) for p in args.n_probes.split(",")]
    quant = faiss.IndexFlatL2(args.dim)
    index = faiss.IndexIVFFlat(quant, args.dim, args.n_lists)
    index.train(x)
    index.add(x)
    faiss_us = {}
    for p in probes:
        index.nprobe = p
        for v in q[:10]:
            index.search(v[None, :], 10)
        t = time.perf_counter()
        for v in q:
            index.search(v[None, :], 10)
        faiss_us[p] = (time.perf_counter() - t) / len(q) * 1e6
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    with tempfile.TemporaryDirectory() as d:
        x.astype("<f4").tofile(os.path.join(d, "base.f32"))
        q.astype("<f4").tofile(os.path.join(d, "queries.f32"))
        open(os.path.join(d, "dim"), "w").write(str(args.dim))
        env = dict(os.environ, RAYON_NUM_THREADS="1")
        out = subprocess.run(["cargo", "bench", "-q", "-p", "sealdb-server", "--bench", "engine", "--",
                              "--data", d, "--n-lists", str(args.n_lists), "--n-probes", args.n_probes],
                             cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    ours = {}
    for line in out.splitlines():
        if line.strip().startswith("{"):
            r = json.loads(line)
            ours[r["n_probes"]] = r["us_per_query"]
    print(f"| n_probes | SealDB engine us/query | FAISS IVFFlat us/query | ratio (SealDB/FAISS) |")
    print("|---|---|---|---|")
    for p in probes:
        print(f"| {p} | {ours[p]:.1f} | {faiss_us[p]:.1f} | {ours[p] / faiss_us[p]:.2f} |")
    print(json.dumps({"n": args.n, "dim": args.dim, "n_lists": args.n_lists, "sealdb_us": ours, "faiss_us": faiss_us}))


if __name__ == "__main__":
    main()
