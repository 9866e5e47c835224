"""S3 mode: the same benchmark on the local disk store and on the S3 store over SeaweedFS,
side by side in one run, plus what only the bucket has: S3 requests per query (cold and
warm, from `sealdb_s3_requests_total`) and the delay before a write acknowledged by one
server is visible on another.

    .venvs/bench/bin/python tests/bench/s3.py --bin target/release/sealdb \\
        --weed .venvs/weed/bin/weed [--scenario 100k-128] [--out docs/bench-results.jsonl]

Starts SeaweedFS (`weed server` with its S3 gateway) and the servers on 127.0.0.1, each on
an empty directory; the disk server is the default redb store.
"""
import argparse
import base64
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import SCENARIOS, Conn, bench, enc, make_data, run_singles, single_query_bodies  # noqa: E402


def free_port():
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p <= 55535:
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", p + 10000))
                    return p
                except OSError:
                    pass


def wait_http(url, method="GET", ok=(200,), timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            req = urllib.request.Request(url, method=method)
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status in ok:
                    return
        except Exception:
            time.sleep(0.25)
    raise RuntimeError(f"{url} did not come up")


def start_weed(binary, work):
    d = os.path.join(work, "weed")
    os.makedirs(d)
    m, v, f, s3 = free_port(), free_port(), free_port(), free_port()
    p = subprocess.Popen([binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={d}",
                          f"-master.port={m}", f"-volume.port={v}", "-volume.max=5", "-filer",
                          f"-filer.port={f}", "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0",
                          "-s3.port.lance=0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{s3}"
    wait_http(f"{url}/sealdb", method="PUT")
    return p, url


def start_sealdb(binary, work, name, env):
    port = free_port()
    e = {k: v for k, v in os.environ.items() if not k.startswith("CYBORGDB_")}
    e.update({"PORT": str(port), "HOST": "127.0.0.1", "AUTO_TRAIN_DISABLED": "true",
              "CYBORGDB_DISK_PATH": os.path.join(work, name), **env})
    p = subprocess.Popen([binary], env=e, stdout=open(os.path.join(work, name + ".log"), "wb"),
                         stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/health")
    return p, url


def s3_requests(url):
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(r'^sealdb_s3_requests_total\{[^}]*\} (\S+)$', text, re.M))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--weed", required=True)
    ap.add_argument("--scenario", default="100k-128", choices=sorted(SCENARIOS))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--label", default="s3")
    ap.add_argument("--out")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sealdb-s3-bench-")
    procs = []
    try:
        weed, s3url = start_weed(a.weed, work)
        procs.append(weed)
        prefix = "bench-" + secrets.token_hex(3)
        s3env = {"CYBORGDB_DB_TYPE": "s3", "CYBORGDB_S3_BUCKET": "sealdb",
                 "CYBORGDB_S3_ENDPOINT": s3url, "CYBORGDB_S3_PREFIX": prefix,
                 "CYBORGDB_S3_ACCESS_KEY": "any", "CYBORGDB_S3_SECRET_KEY": "any"}
        rows = []
        for store, env in (("disk", {}), ("s3", s3env)):
            p, url = start_sealdb(a.bin, work, store, env)
            procs.append(p)
            args = types.SimpleNamespace(url=url, api_key=None, seed=a.seed, label=f"{a.label}-{store}",
                                         sweep_probes=None, pid=p.pid, keep=False)
            r = bench(args, a.scenario)
            r["store"] = store
            rows.append(r)
            print(json.dumps(r), flush=True)
            if store == "s3":
                s3a = url
        # A second server on the same bucket, on an empty directory: cold, then warm.
        pb, urlb = start_sealdb(a.bin, work, "s3-b", s3env)
        procs.append(pb)
        n, dim, metric, precision, scale = SCENARIOS[a.scenario]
        _, q = make_data(n, dim, scale, a.seed)
        conn = Conn(urlb, None)
        # An index written through A, queried through B.
        key = secrets.token_hex(32)
        probe_name = "probe-" + secrets.token_hex(3)
        ca = Conn(s3a, None)
        ca.post("/v1/indexes/create", enc({"index_name": probe_name, "index_key": key, "dimension": dim}))
        x, _ = make_data(n, dim, scale, a.seed)
        for s in range(0, n, 1000):
            ca.post("/v1/vectors/upsert_binary", enc({"index_name": probe_name, "index_key": key, "batch": {
                "ids": [str(i) for i in range(s, min(s + 1000, n))],
                "vectors_b64": base64.b64encode(np.ascontiguousarray(x[s:s + 1000], dtype="<f4").tobytes()).decode(),
                "dimension": dim}}))
        ca.post("/v1/indexes/train", enc({"index_name": probe_name, "index_key": key}))
        time.sleep(1.2)  # past B's refresh bound
        bodies = single_query_bodies(probe_name, key, q[:200])
        out = {"scenario": a.scenario, "server": f"{a.label}-s3-second-server", "store": "s3"}
        for phase in ("cold", "warm"):
            before = s3_requests(urlb)
            lat, _, qps = run_singles(conn, bodies)
            after = s3_requests(urlb)
            out[f"{phase}_p50_ms"] = float(np.percentile(lat, 50) * 1e3)
            out[f"{phase}_first_ms"] = float(lat[0] * 1e3)
            out[f"{phase}_s3_requests_per_query"] = (after - before) / len(bodies)
        # Visibility: a write acknowledged on A, polled for on B (default 1 s bound).
        delays = []
        for i in range(20):
            vid = f"vis-{i}"
            ca.post("/v1/vectors/upsert", enc({"index_name": probe_name, "index_key": key,
                                                "items": [{"id": vid, "vector": q[i].tolist()}]}))
            t0 = time.perf_counter()
            while True:
                r = conn.post("/v1/vectors/get", enc({"index_name": probe_name, "index_key": key,
                                                      "ids": [vid], "include": []}))
                if r["results"]:
                    break
                time.sleep(0.01)
            delays.append(time.perf_counter() - t0)
        out["visibility_p50_ms"] = float(np.percentile(delays, 50) * 1e3)
        out["visibility_max_ms"] = float(np.max(delays) * 1e3)
        print(json.dumps(out), flush=True)
        rows.append(out)
        if a.out:
            with open(a.out, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
