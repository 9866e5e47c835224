"""Side by side with the original: the same requests to cyborgdb-service 0.18.0 (PyPI, run
offline on 127.0.0.1 by this module) and to SealDB, on the same items, must give the same
answers where SealDB follows the original (filters on nulls, lists and nested objects;
metadata key order; query_metadata). tests/run.sh installs the service into its own venv and
sets SEALDB_ORIGINAL18_PYTHON."""
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import Api, free_port

PY = os.environ.get("SEALDB_ORIGINAL18_PYTHON")
pytestmark = pytest.mark.skipif(not PY, reason="SEALDB_ORIGINAL18_PYTHON not set (tests/run.sh sets it)")
ROOT_KEY = "root-key-for-side-by-side-0123456789"
LAUNCH = Path(__file__).resolve().parent / "bench" / "launch_original.py"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    d = tmp_path_factory.mktemp("original18")
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(d), "TMPDIR": str(d),
           "PORT": str(port), "CYBORGDB_DB_TYPE": "disk", "CYBORGDB_DISK_PATH": str(d / "db"),
           "CYBORGDB_SERVICE_ROOT_KEY": ROOT_KEY, "AUTO_TRAIN_DISABLED": "true"}
    log = open(d / "server.log", "wb")
    proc = subprocess.Popen([PY, str(LAUNCH)], env=env, cwd=d, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if requests.get(url + "/v1/health", timeout=1).ok:
                break
        except requests.ConnectionError:
            pass
        assert proc.poll() is None and time.time() < deadline, (d / "server.log").read_text()[-3000:]
        time.sleep(0.3)
    yield Api(url, ROOT_KEY)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


ITEMS = [
    {"id": "a", "vector": [1, 0], "metadata": {"zeta": 1, "alpha": 2, "mid": {"y": 1, "b": None},
                                               "n": None, "l": ["x", None], "s": "b", "g": "x"}},
    {"id": "b", "vector": [0, 1], "metadata": {"alpha": 3, "n": 5, "l": ["y", "x"], "y": 1, "s": "a", "g": "x"}},
    {"id": "c", "vector": [1, 1], "metadata": {"other": True, "l": [], "mid": {"y": 2}, "y": "str", "g": "z"}},
    {"id": "d", "vector": [0.5, 0.5], "metadata": {"n": "str", "alpha": None, "mid": None, "l": [None],
                                                   "y": 2.5, "s": ["q"]}},
    {"id": "e", "vector": [0.5, 0.2], "metadata": {"y": 7, "deep": {"er": {"x": 1}}}},
]

FILTERS = [
    {"n": None}, {"n": {"$eq": None}}, {"n": {"$ne": None}}, {"n": {"$exists": True}},
    {"n": {"$exists": False}}, {"n": {"$in": [None, 5]}}, {"n": {"$nin": [None]}},
    {"alpha": {"$ne": 2}}, {"alpha": {"$nin": [2]}}, {"alpha": {"$lt": 10}},
    {"$not": {"n": {"$eq": 5}}}, {"$nor": [{"n": None}]}, {"$or": [{"n": None}, {"alpha": 3}]},
    {"mid": {"$exists": True}}, {"mid.b": {"$exists": True}}, {"mid.y": {"$exists": True}},
    {"mid.y": {"$ne": 1}}, {"mid.y": 1}, {"deep.er.x": 1}, {"l": "x"}, {"l": {"$ne": "x"}},
    {"l": {"$nin": ["x"]}}, {"l": {"$exists": True}}, {"l": {"$ne": None}}, {"l": {"$in": ["y"]}},
    {"l": ["y", "x"]}, {"other": True}, {"other": 1}, {"y": {"$gte": 2.5}}, {"n": {"$regex": "s"}},
    {"g": {"$in": ["x", "z"]}, "y": {"$exists": True}}, {"zeta": {"$exists": False}},
]


@pytest.fixture(scope="module")
def pair(original, server):
    ours = Api(server.url)
    name, key = f"sbs-{secrets.token_hex(3)}", secrets.token_hex(32)
    for api in (original, ours):
        assert api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2})[0] == 200
        assert api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": ITEMS})[0] == 200
    return original, ours, name, key


def ask_both(theirs, ours, name, key, path, body):
    """The same request to the original and to us: both answers, each checked to be a 200."""
    out = []
    for api in (theirs, ours):
        st, b = api.post(path, {"index_name": name, "index_key": key, **body})
        assert st == 200, (api.url, b)
        out.append(b)
    return out


@pytest.mark.parametrize("f", FILTERS, ids=[json.dumps(f) for f in FILTERS])
def test_vector_query_filters_match_the_original(pair, f):
    theirs, ours, name, key = pair
    got = []
    for api in (theirs, ours):
        st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": [1, 0],
                                               "top_k": 10, "filters": f, "include": []})
        assert st == 200, (api.url, b)
        got.append(sorted(r["id"] for r in b["results"]))
    assert got[1] == got[0]


def test_metadata_key_order_matches_the_original(pair):
    theirs, ours, name, key = pair
    rows = []
    for api in (theirs, ours):
        st, b = api.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["a", "c", "e"],
                                             "include": ["metadata"]})
        assert st == 200
        rows.append({r["id"]: json.dumps(r["metadata"]) for r in b["results"]})
    assert rows[1] == rows[0]


@pytest.mark.parametrize("body", [
    {}, {"filters": {"g": "x"}}, {"filters": {"$or": [{"g": "z"}, {"y": 1}]}},
    {"order_by": "y"}, {"order_by": "y", "ascending": False}, {"order_by": {"y": -1}},
    {"order_by": {"y": 1}, "top_k": 2}, {"filters": {"y": {"$gt": 2}}, "order_by": "y"},
    {"filters": {"n": {"$ne": None}}},
])
def test_query_metadata_matches_the_original(pair, body):
    got = []
    for b in ask_both(*pair, "/v1/vectors/query_metadata", body):
        assert b["ids"] == [r["id"] for r in b["results"]] and b["count"] == len(b["ids"])
        got.append(b["ids"] if "order_by" in body else sorted(b["ids"]))
    assert got[1] == got[0]


@pytest.mark.parametrize("body", [
    {"filters": {"s": {"$regex": "a"}}}, {"filters": {"g": {"$contains": "x"}}},
    {"filters": {"g": {"$type": "string"}}}, {"text": "hello"}, {"order_by": {"y": 1, "s": 1}},
])
def test_query_metadata_refusals_match_the_original(pair, body):
    theirs, ours, name, key = pair
    for api in (theirs, ours):
        st, _ = api.post("/v1/vectors/query_metadata", {"index_name": name, "index_key": key, **body})
        assert st == 400, api.url


def test_metadata_schema_matches_the_original(original, server):
    ours = Api(server.url)
    name, key = f"sbs-schema-{secrets.token_hex(3)}", secrets.token_hex(32)
    schema = {"g": {"filterable": False}, "s": {"pattern": True}}
    items = [{"id": "a", "vector": [1, 0], "metadata": {"g": "x", "s": "abc", "h": "q"}},
             {"id": "b", "vector": [0, 1], "metadata": {"g": "y", "s": "zzz", "h": "r"}}]
    answers = []
    for api in (original, ours):
        assert api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2,
                                               "metadata_schema": schema})[0] == 200
        api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})
        st, d = api.post("/v1/indexes/describe", {"index_name": name, "index_key": key})
        # The original says `"bm25": null`; ours leaves the field out (the spec has no null).
        got = [json.dumps(d["metadata_schema"]), d.get("bm25")]
        for f in [{"g": "x"}, {"s": {"$regex": "^a"}}, {"s": {"$contains": "b"}}, {"h": {"$regex": "q"}},
                  {"s": "abc"}]:
            st, b = api.post("/v1/vectors/query_metadata", {"index_name": name, "index_key": key, "filters": f})
            got.append((st, sorted(b["ids"]) if st == 200 else None))
        answers.append(got)
    assert answers[1] == answers[0]


WORDS = ("fox dog cat bird quick lazy brown red running runs runner jumped jumping over under "
         "the a of with this forest river mountain news world daily shoes sleeping sleeps "
         "encrypted vector database search index").split()
STOP = {"the", "a", "of", "with", "this"}


def text_items(n=60, seed=5):
    """Items whose title and body lengths (in non-stopword terms) differ from every other
    item's, so that BM25 scores rarely tie (the original orders ties its own way)."""
    import random
    rnd = random.Random(seed)
    content = [w for w in WORDS if w not in STOP]
    out = []
    for i in range(n):
        title = [rnd.choice(content) for _ in range(i % 60 + 1)] + [rnd.choice(sorted(STOP))]
        body = [rnd.choice(content) for _ in range((i * 7) % 60 + 1)]
        meta = {"title": " ".join(title).capitalize(), "k": i % 4}
        if i % 9:
            meta["body"] = {"text": " ".join(body)}
        out.append({"id": f"doc{i:02d}", "vector": [rnd.random(), rnd.random()], "metadata": meta})
    return out


@pytest.fixture(scope="module")
def text_pair(original, server):
    ours = Api(server.url)
    name, key = f"sbs-text-{secrets.token_hex(3)}", secrets.token_hex(32)
    for api in (original, ours):
        st, b = api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2,
                                                 "text_fields": ["title", "body.text"], "bm25_k1": 1.4, "bm25_b": 0.7})
        assert st == 200, b
        assert api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": text_items()})[0] == 200
        # Overwrites and deletes: the text index must follow them.
        assert api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": text_items(8, seed=9)})[0] == 200
        assert api.post("/v1/vectors/delete", {"index_name": name, "index_key": key, "ids": ["doc03", "doc10"]})[0] == 200
    return original, ours, name, key


def untied(rows, limit=None, key="score"):
    """Ids and scores in order, cut before the first score tie (the original orders ties its
    own way); ties are looked for in all `rows`, the result holds at most `limit`."""
    out = []
    for i, r in enumerate(rows[:limit]):
        if any(abs(o[key] - r[key]) <= 1e-6 * max(1.0, abs(r[key])) for j, o in enumerate(rows) if j != i):
            break
        out.append((r["id"], r[key]))
    return out


def same_ranking(a, b):
    """Same ids in the same order, scores equal up to float32 rounding (the original scores
    in float32)."""
    return [i for i, _ in a] == [i for i, _ in b] and all(
        abs(x - y) <= 1e-5 * max(1.0, abs(x)) for (_, x), (_, y) in zip(a, b))


TEXT_QUERIES = [
    {"text": "fox"}, {"text": "running foxes"}, {"text": "quick brown dog"},
    {"text": "fox dog", "require_all_terms": True}, {"text": "database search", "text_fields": ["body.text"]},
    {"text": "river mountain", "text_field_weights": [2.0, 0.5]}, {"text": "sleeping cat", "filters": {"k": {"$in": [1, 2]}}},
    {"text": "news world", "top_k": 5}, {"text": "with the of"},
]


@pytest.mark.parametrize("body", TEXT_QUERIES, ids=[json.dumps(b) for b in TEXT_QUERIES])
def test_bm25_text_queries_rank_as_the_original(text_pair, body):
    got = [(untied(b["results"]), len(b["results"]))
           for b in ask_both(*text_pair, "/v1/vectors/query_metadata", body)]
    assert same_ranking(got[1][0], got[0][0]) and got[1][1] == got[0][1], got
    assert got[0][0] or body["text"] == "with the of", "the comparison must cover some results"


HYBRID = [
    {"text": "fox"}, {"text": "running foxes", "alpha": 0.3}, {"text": "quick dog", "alpha": 0.0},
    {"text": "quick dog", "alpha": 1.0}, {"text": "river", "rrf_k": 10, "window_mult": 2},
    {"text": "bird news", "filters": {"k": 1}}, {"text": "encrypted index", "text_fields": ["title"], "top_k": 4},
]


@pytest.mark.parametrize("body", HYBRID, ids=[json.dumps(b) for b in HYBRID])
def test_hybrid_queries_fuse_as_the_original(text_pair, body):
    got = []
    for b in ask_both(*text_pair, "/v1/vectors/query", {"query_vectors": [0.3, 0.7], "top_k": 12, **body}):
        assert all("distance" not in r for r in b["results"])
        got.append(untied(b["results"], limit=8))
    assert same_ranking(got[1], got[0]) and got[0], got


def test_bm25_describe_and_create_refusals_match_the_original(original, server):
    ours = Api(server.url)
    key = secrets.token_hex(32)
    for extra, status in [({"bm25_k1": 1.5}, 400), ({"text_fields": ["t"], "bm25_k1": -1}, 400),
                          ({"text_fields": ["t"], "bm25_b": 1.5}, 400),
                          ({"text_fields": ["t"], "metadata_schema": {"t": {"filterable": True}}}, 400),
                          ({"text_fields": [""]}, 422), ({"text_fields": ["t", "t"], "bm25_k1": 0}, 200)]:
        got = []
        for api in (original, ours):
            name = f"sbs-c-{secrets.token_hex(3)}"
            st, _ = api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2, **extra})
            d = None
            if st == 200:
                d = api.post("/v1/indexes/describe", {"index_name": name, "index_key": key})[1]
                d = (d["metadata_schema"], d["bm25"]["k1"], d["bm25"]["b"])
            got.append((st, d))
        assert got[1] == got[0] and got[0][0] == status, extra


@pytest.mark.parametrize("precision", ["tq12", "tq8", "tq6", "tq4"])
def test_quantized_precisions_lose_about_what_the_original_loses(original, server, precision):
    """The 0.18 tq tiers store a lossy vector and return it: on the same Gaussian data the
    relative error of what get returns, and the top-10 recall of queries against the exact
    float32 neighbours, come out close to the original's."""
    import numpy as np
    ours = Api(server.url)
    rng = np.random.default_rng(4)
    vecs = rng.standard_normal((400, 96)).astype(np.float32)
    queries = rng.standard_normal((20, 96)).astype(np.float32)
    exact = np.argsort(((queries[:, None, :] - vecs[None]) ** 2).sum(-1), axis=1)[:, :10]
    key = secrets.token_hex(32)
    stats = []
    for api in (original, ours):
        name = f"sbs-{precision}-{secrets.token_hex(3)}"
        st, b = api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 96,
                                                 "storage_precision": precision})
        assert st == 200, b
        items = [{"id": str(i), "vector": v.tolist()} for i, v in enumerate(vecs)]
        assert api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})[0] == 200
        st, g = api.post("/v1/vectors/get", {"index_name": name, "index_key": key,
                                             "ids": [str(i) for i in range(400)], "include": ["vector"]})
        got = np.array([r["vector"] for r in sorted(g["results"], key=lambda r: int(r["id"]))])
        rel = float(np.sqrt(((got - vecs) ** 2).sum() / (vecs ** 2).sum()))
        hits = 0
        for q, want in zip(queries, exact):
            st, r = api.post("/v1/vectors/query", {"index_name": name, "index_key": key,
                                                   "query_vectors": q.tolist(), "top_k": 10})
            hits += len({int(x["id"]) for x in r["results"]} & set(want.tolist()))
        stats.append((rel, hits / 200))
    (their_rel, their_recall), (our_rel, our_recall) = stats
    assert 0 < our_rel <= their_rel * 1.15 + 1e-5, stats
    assert our_recall >= their_recall - 0.03, stats
