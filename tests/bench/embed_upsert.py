#!/usr/bin/env python3
"""End-to-end text upserts over HTTP: an index with embedding_model all-MiniLM-L6-v2, items
carrying only `contents`, batches of BATCH texts; prints texts/s as one JSON line.

    embed_upsert.py --url http://127.0.0.1:8000 [--n 2048] [--batch 256]

Works against any server that embeds server-side (ours needs the model installed:
scripts/fetch-model.sh; the original needs its model cache).
"""
import argparse
import json
import secrets
import time
import urllib.request

WORDS = ("encrypted vector search weather stadium river compiler garden market music orbit "
         "harbour winter library engine forest").split()


def post(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args()
    name, key = f"embed-bench-{secrets.token_hex(3)}", secrets.token_hex(32)
    post(a.url, "/v1/indexes/create", {"index_name": name, "index_key": key,
                                       "embedding_model": "all-MiniLM-L6-v2"})
    texts = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8 + i % 9))
             for i in range(a.n)]
    bodies = [{"index_name": name, "index_key": key,
               "items": [{"id": str(i + j), "contents": t} for j, t in enumerate(texts[i:i + a.batch])]}
              for i in range(0, a.n, a.batch)]
    t = time.perf_counter()
    for b in bodies:
        post(a.url, "/v1/vectors/upsert", b)
    secs = time.perf_counter() - t
    post(a.url, "/v1/indexes/delete", {"index_name": name, "index_key": key})
    print(json.dumps({"bench": "embed_upsert", "texts": a.n, "batch": a.batch,
                      "texts_per_s": round(a.n / secs, 1)}))


if __name__ == "__main__":
    main()
