#!/usr/bin/env python3
"""Large-index benchmark (issue 14's `10m-128` scenario): one SealDB server under a cache budget,
an index far larger than the budget, data generated in seeded chunks so this client never
holds it all.

    big.py --bin target/release/sealdb --work /tmp/big [--n 10000000] [--cache-mb 1024]
           [--drop-caches] [--passes N | --only upsert | --only cold]

Phases, each printed as it finishes and all together as one JSON line at the end:
  1. generate: request bodies (batches of 1000, binary upsert) written once under --work and
     reused by later runs with the same --n/--seed; the exact top-10 of every query is computed
     chunk by chunk at the same time (not timed);
  2. upsert: every body, one after another on one kept-alive connection (vectors/s);
  3. train: explicit training with the server's defaults (seconds);
  4. warm: single queries at the default n_probes (p50/p99 ms, recall@10);
  5. cold: the server is restarted (empty block cache) and queries whose data centres differ
     are sent one by one; with --drop-caches (root) the kernel's page cache is dropped too, so
     their blocks come from the disk; bytes read per query come from /proc/PID/io;
  6. disk: bytes under the data directory, against the raw vector bytes (after the upsert, right
     after the training, and once the store has settled: the old generation's files go when
     the store's log reaches the training's last batch); the disk's random-read
     throughput for blocks of the same size, read with O_DIRECT, as the anchor for cold queries.
Peak RSS is the largest VmHWM of the server processes (sampled, and read before each stop).
"""
import argparse
import base64
import hashlib
import json
import mmap
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Conn, recall, run_singles  # noqa: E402  (bench.py's client, query loop, recall)

DIM = 128
BATCH = 1000
CHUNK = 100_000  # rows per generation task (100 bodies)
N_CLUSTERS = 256
N_QUERIES = 500
NAME = "big"


def key_for(seed):
    return hashlib.sha256(f"sealdb-big-bench-{seed}".encode()).hexdigest()


def centres(seed):
    return np.random.default_rng(seed).normal(0.0, 3.0, (N_CLUSTERS, DIM)).astype(np.float32)


def queries(seed):
    rng = np.random.default_rng([seed, 1])
    c = centres(seed)
    # Query i comes from centre i % 256, so the first 256 queries come from distinct centres.
    idx = np.arange(N_QUERIES) % N_CLUSTERS
    return (c[idx] + rng.normal(0.0, 1.0, (N_QUERIES, DIM))).astype(np.float32)


def gen_chunk(args):
    """Write the bodies of rows [start, start+CHUNK) and return their top-10 per query."""
    seed, start, n, bodies_dir = args
    rows = min(CHUNK, n - start)
    rng = np.random.default_rng([seed, 2, start])
    c = centres(seed)
    x = (c[rng.integers(0, N_CLUSTERS, rows)] + rng.normal(0.0, 1.0, (rows, DIM))).astype(np.float32)
    key = key_for(seed)
    for s in range(0, rows, BATCH):
        path = os.path.join(bodies_dir, f"{(start + s) // BATCH:06d}.json")
        if not os.path.exists(path):
            ids = [str(start + s + i) for i in range(min(BATCH, rows - s))]
            body = {"index_name": NAME, "index_key": key, "batch": {
                "ids": ids, "vectors_b64": base64.b64encode(x[s:s + BATCH].astype("<f4").tobytes()).decode(),
                "dimension": DIM}}
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(body, f)
            os.replace(tmp, path)
    q = queries(seed)
    d = (x.astype(np.float64) ** 2).sum(1)[None, :] - 2.0 * (q.astype(np.float64) @ x.T.astype(np.float64))
    part = np.argpartition(d, 10, axis=1)[:, :10]
    return start, np.take_along_axis(d, part, 1), part + start


def generate(work, n, seed):
    bodies = os.path.join(work, f"bodies-{n}-{seed}")
    truth_path = os.path.join(work, f"truth-{n}-{seed}.npy")
    os.makedirs(bodies, exist_ok=True)
    if os.path.exists(truth_path) and len(os.listdir(bodies)) == (n + BATCH - 1) // BATCH:
        return bodies, np.load(truth_path)
    qn = N_QUERIES
    best_d = np.full((qn, 10), np.inf)
    best_i = np.zeros((qn, 10), dtype=np.int64)
    with mp.Pool(2) as pool:
        for _, d, i in pool.imap_unordered(gen_chunk, [(seed, s, n, bodies) for s in range(0, n, CHUNK)]):
            cd = np.concatenate([best_d, d], 1)
            ci = np.concatenate([best_i, i], 1)
            o = np.argsort(cd, axis=1, kind="stable")[:, :10]
            best_d = np.take_along_axis(cd, o, 1)
            best_i = np.take_along_axis(ci, o, 1)
    np.save(truth_path, best_i)
    return bodies, best_i


class Server:
    def __init__(self, binary, data, port, flags):
        self.binary, self.data, self.port, self.flags = binary, data, port, flags
        self.proc = None
        self.peak_kb = 0
        self._stop = threading.Event()

    def start(self):
        env = {"PATH": os.environ["PATH"], "HOME": self.data, "PORT": str(self.port),
               "CYBORGDB_DB_TYPE": "disk", "CYBORGDB_DISK_PATH": os.path.join(self.data, "db"),
               "AUTO_TRAIN_DISABLED": "true"}
        log = open(os.path.join(self.data, "server.log"), "ab")
        self.proc = subprocess.Popen([self.binary, *self.flags], cwd=self.data, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("server did not start")
        self._stop.clear()
        threading.Thread(target=self._sample, daemon=True).start()

    def _status_kb(self, field):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(field):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _sample(self):
        while not self._stop.wait(0.5):
            self.peak_kb = max(self.peak_kb, self._status_kb("VmHWM:"))

    def io(self):
        out = {}
        with open(f"/proc/{self.proc.pid}/io") as f:
            for line in f:
                k, v = line.split(":")
                out[k] = int(v)
        return out

    def stop(self):
        self.peak_kb = max(self.peak_kb, self._status_kb("VmHWM:"))
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def random_read(path, block, seconds=3.0):
    """Random O_DIRECT reads of `block` bytes (rounded up to 4 KiB) at QD1: MB/s and ms/read."""
    block = (block + 4095) // 4096 * 4096
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, block)
    n, t0 = 0, time.perf_counter()
    rnd = random.Random(1)
    try:
        while time.perf_counter() - t0 < seconds:
            off = rnd.randrange(0, max(1, size - block)) // 4096 * 4096
            os.preadv(fd, [buf], off)
            n += 1
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    return {"block_bytes": block, "mb_per_s": n * block / dt / 1e6, "ms_per_read": dt / n * 1e3}


def qbody(key, v):
    return json.dumps({"index_name": NAME, "index_key": key, "query_vectors": v.tolist(),
                       "top_k": 10}).encode()


def singles(conn, bodies):
    lat, found, _ = run_singles(conn, bodies)
    return lat, found


def passes(args):
    """`--passes N`: a fresh server on the trained data of an earlier run, N timed passes."""
    truth = np.load(os.path.join(args.work, f"truth-{args.n}-{args.seed}.npy"))
    key = key_for(args.seed)
    qbodies = [qbody(key, v) for v in queries(args.seed)]
    srv = Server(os.path.abspath(args.bin), os.path.join(args.work, "server"), args.port,
                 ["--index-cache-mb", str(args.cache_mb)])
    srv.start()
    conn = Conn(f"http://127.0.0.1:{args.port}", None)
    out = []
    for i in range(args.passes):
        lat, found = singles(conn, qbodies)
        out.append({"pass": i, "p50_ms": float(np.percentile(lat, 50) * 1e3),
                    "p99_ms": float(np.percentile(lat, 99) * 1e3), "recall_at_10": recall(found, truth)})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    conn.c.close()
    srv.stop()
    print(json.dumps({"passes": out, "peak_rss_mb": srv.peak_kb / 1024}))


def settle(path, quiet_s=15.0, limit_s=180.0):
    """`du(path)` once it has not changed for `quiet_s`, and the seconds until that began."""
    t0 = time.perf_counter()
    last, since = du(path), 0.0
    while time.perf_counter() - t0 < limit_s:
        time.sleep(0.25)
        now = du(path)
        if now != last:
            last, since = now, time.perf_counter() - t0
        elif time.perf_counter() - t0 - since >= quiet_s:
            break
    return last, since


def fresh_server(args, data):
    """A server on an emptied data directory `data`, with the benchmark's index created."""
    subprocess.run(["rm", "-rf", data], check=True)
    os.makedirs(data)
    srv = Server(os.path.abspath(args.bin), data, args.port, ["--index-cache-mb", str(args.cache_mb)])
    srv.start()
    conn = Conn(f"http://127.0.0.1:{args.port}", None)
    conn.post("/v1/indexes/create", json.dumps({"index_name": NAME, "index_key": key_for(args.seed),
                                                "dimension": DIM, "metric": "euclidean"}).encode())
    return srv, conn


def server_cpu_s(srv):
    with open(f"/proc/{srv.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def upsert_only(args):
    """`--only upsert`: phase 2 alone, into `--work`/upsert (replaced)."""
    bodies_dir, _ = generate(args.work, args.n, args.seed)
    srv, conn = fresh_server(args, os.path.join(args.work, "upsert"))
    files = sorted(os.listdir(bodies_dir))
    cpu0, t0 = server_cpu_s(srv), time.perf_counter()
    for f in files:
        with open(os.path.join(bodies_dir, f), "rb") as fh:
            conn.post("/v1/vectors/upsert_binary", fh.read())
    dt = time.perf_counter() - t0
    cores = (server_cpu_s(srv) - cpu0) / dt
    conn.c.close()
    srv.stop()
    print(json.dumps({"upsert_binary_vps": args.n / dt, "server_cores": cores,
                      "peak_rss_mb": srv.peak_kb / 1024}))


def cold_only(args):
    """`--only cold`: phase 5 alone, on the trained data of an earlier run."""
    truth = np.load(os.path.join(args.work, f"truth-{args.n}-{args.seed}.npy"))
    key = key_for(args.seed)
    qbodies = [qbody(key, v) for v in queries(args.seed)][:args.cold_queries]
    if args.drop_caches:
        drop_caches()
    srv = Server(os.path.abspath(args.bin), os.path.join(args.work, "server"), args.port,
                 ["--index-cache-mb", str(args.cache_mb)])
    srv.start()
    conn = Conn(f"http://127.0.0.1:{args.port}", None)
    io0 = srv.io()
    lat, found = singles(conn, qbodies)
    io1 = srv.io()
    conn.c.close()
    srv.stop()
    print(json.dumps({"cold_p50_ms": float(np.percentile(lat, 50) * 1e3),
                      "disk_bytes_per_query": (io1["read_bytes"] - io0["read_bytes"]) / len(lat),
                      "recall_at_10": recall(found, truth[:len(lat)])}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cache-mb", type=int, default=1024)
    ap.add_argument("--port", type=int, default=18831)
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--cold-queries", type=int, default=50)
    ap.add_argument("--passes", type=int, default=0,
                    help="only start a fresh server on the data an earlier run left under --work and "
                         "time this many passes over the queries (p50/p99 per pass; the first is cold)")
    ap.add_argument("--only", choices=["upsert", "cold"],
                    help="upsert: only upsert every body into a fresh data directory under --work "
                         "(vectors/s, server cores, peak RSS; it leaves the index untrained); "
                         "cold: only the cold phase on the trained data an earlier run left there "
                         "(with --drop-caches, the page cache dropped first)")
    args = ap.parse_args()
    if args.passes:
        return passes(args)
    if args.only == "upsert":
        return upsert_only(args)
    if args.only == "cold":
        return cold_only(args)
    os.makedirs(args.work, exist_ok=True)
    out = {"scenario": f"{args.n // 1_000_000}m-128" if args.n >= 1_000_000 else f"{args.n}-128",
           "n": args.n, "cache_mb": args.cache_mb}

    def report(**kv):
        out.update(kv)
        print(json.dumps(kv), file=sys.stderr, flush=True)

    t = time.perf_counter()
    bodies_dir, truth = generate(args.work, args.n, args.seed)
    report(generate_s=time.perf_counter() - t)
    key = key_for(args.seed)
    q = queries(args.seed)
    qbodies = [qbody(key, v) for v in q]

    data = os.path.join(args.work, "server")
    srv, conn = fresh_server(args, data)
    files = sorted(os.listdir(bodies_dir))
    # Read the bodies once so that the timed loop sends from the page cache, not the disk
    # (an earlier --drop-caches run leaves them cold).
    for f in files:
        with open(os.path.join(bodies_dir, f), "rb") as fh:
            while fh.read(1 << 20):
                pass
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        with open(os.path.join(bodies_dir, f), "rb") as fh:
            conn.post("/v1/vectors/upsert_binary", fh.read())
        if i % 1000 == 999:
            print(f"  upserted {(i + 1) * BATCH} in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    report(upsert_binary_vps=args.n / (time.perf_counter() - t0), rss_after_upsert_mb=srv.peak_kb / 1024,
           disk_after_upsert_bytes=du(data))

    t0 = time.perf_counter()
    conn.post("/v1/indexes/train", json.dumps({"index_name": NAME, "index_key": key}).encode())
    info = conn.post("/v1/indexes/describe", json.dumps({"index_name": NAME, "index_key": key}).encode())
    report(train_s=time.perf_counter() - t0, n_lists=info.get("n_lists"), rss_after_train_mb=srv.peak_kb / 1024,
           disk_after_train_bytes=du(data))
    # The store gives the old generation's space back once its log has reached the batch
    # that dropped it: how long after the training that takes, and what is left then.
    settled, t1 = settle(data)
    report(disk_after_train_settled_bytes=settled, disk_settle_s=t1)

    singles(conn, qbodies[:20])
    lat, found = singles(conn, qbodies)
    report(warm_p50_ms=float(np.percentile(lat, 50) * 1e3), warm_p99_ms=float(np.percentile(lat, 99) * 1e3),
           recall_at_10=recall(found, truth))
    lat, _ = singles(conn, qbodies)
    report(warm2_p50_ms=float(np.percentile(lat, 50) * 1e3))
    conn.c.close()
    srv.stop()
    report(peak_rss_mb=srv.peak_kb / 1024)

    for mode in (["os-cache", "disk"] if args.drop_caches else ["os-cache"]):
        if mode == "disk":
            drop_caches()
        srv.start()
        conn = Conn(f"http://127.0.0.1:{args.port}", None)
        io0 = srv.io()
        lat, found = singles(conn, qbodies[:args.cold_queries])
        io1 = srv.io()
        report(**{f"cold_{mode}_p50_ms": float(np.percentile(lat, 50) * 1e3),
                  f"cold_{mode}_first_ms": float(lat[0] * 1e3),
                  f"cold_{mode}_disk_bytes_per_query": (io1["read_bytes"] - io0["read_bytes"]) / len(lat),
                  f"cold_{mode}_read_bytes_per_query": (io1["rchar"] - io0["rchar"]) / len(lat),
                  f"cold_{mode}_recall_at_10": recall(found, truth[:args.cold_queries])})
        conn.c.close()
        srv.stop()
    report(peak_rss_mb=srv.peak_kb / 1024)
    disk = du(data)
    raw = args.n * DIM * 4
    report(disk_bytes=disk, raw_bytes=raw, disk_over_raw=disk / raw)
    dbs = [os.path.join(r, f) for r, _, fs in os.walk(data) for f in fs]
    biggest = max(dbs, key=os.path.getsize)
    if args.drop_caches:
        drop_caches()
        report(disk_random_read=random_read(biggest, 56 * 1024))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
