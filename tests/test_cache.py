"""The index cache budget: with SEALDB_INDEX_CACHE_MB=0 nothing stays decrypted in memory
between requests, and every behaviour is unchanged."""
import concurrent.futures as cf
import time

from conftest import Api, new_key, unique


def test_cache_off_behaves_the_same(make_server):
    s = make_server(env={"SEALDB_INDEX_CACHE_MB": "0", "AUTO_TRAIN_MIN_VECTORS": "300",
                         "CYBORGDB_SERVICE_ROOT_KEY": "root-c"}, name="nocache")
    a = Api(s.url, "root-c")
    name, key = unique(), new_key()
    assert a.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2})[0] == 200

    def upsert(t):
        items = [{"id": f"{t}-{i}", "vector": [t, i], "contents": f"c{t}-{i}"} for i in range(40)]
        return a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})[0]

    with cf.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(upsert, range(8))) == [200] * 8  # 320 vectors: background training
    deadline = time.time() + 60
    while time.time() < deadline:
        d = a.post("/v1/indexes/describe", {"index_name": name, "index_key": key})[1]
        if d["is_trained"]:
            break
        time.sleep(0.1)
    assert d["is_trained"] and d["num_vectors"] == 320
    st, b = a.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": [3, 7],
                                         "top_k": 1, "include": ["distance"]})
    assert b["results"] == [{"id": "3-7", "distance": 0.0}]
    assert a.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["5-5"],
                                      "include": ["contents"]})[1]["results"] == [{"id": "5-5", "contents": "c5-5"}]
    assert a.post("/v1/indexes/describe", {"index_name": name, "index_key": new_key()})[0] == 401
    assert a.post("/v1/indexes/describe", {"index_name": name})[0] == 401
    user = a.post(f"/v1/indexes/{name}/users", {"permissions": ["read"], "index_key": key})[1]
    u = Api(s.url, user["api_key"])
    assert u.post("/v1/vectors/num_vectors", {"index_name": name})[1]["result"] == 320
    assert a.post("/v1/vectors/delete", {"index_name": name, "index_key": key, "ids": ["0-0"]})[0] == 200
    assert u.post("/v1/vectors/num_vectors", {"index_name": name})[1]["result"] == 319


def test_small_budget_serves_more_indexes_than_fit(make_server):
    s = make_server(env={"SEALDB_INDEX_CACHE_MB": "1"}, name="smallcache")
    a = Api(s.url)
    made = []
    for _ in range(3):
        name, key = unique(), new_key()
        a.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 64})
        items = [{"id": str(i), "vector": [float(i)] * 64} for i in range(2500)]  # ~0.9 MB each
        assert a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})[0] == 200
        made.append((name, key))
    for _ in range(2):
        for name, key in made:
            st, b = a.post("/v1/vectors/query", {"index_name": name, "index_key": key,
                                                 "query_vectors": [7.0] * 64, "top_k": 1})
            assert st == 200 and b["results"] == [{"id": "7"}]


def test_index_far_larger_than_the_budget_answers_as_unbounded(make_server):
    """20k x 128 float32 (about 11 MB decrypted) under a 2 MiB block cache: the same answers,
    in the same order, as a server with the default budget, and the cache stays within its
    budget (read from /metrics)."""
    import numpy as np
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    small = make_server(env={"SEALDB_INDEX_CACHE_MB": "2", "AUTO_TRAIN_DISABLED": "true"}, name="tiny")
    big = make_server(env={"AUTO_TRAIN_DISABLED": "true"}, name="roomy")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20_000, 128)).astype(np.float32) + rng.integers(0, 8, (20_000, 1))
    q = rng.normal(size=(12, 128)).astype(np.float32) + 3
    key = new_key()
    answers = []
    for s in (small, big):
        a = Api(s.url)
        name = "bigger-than-budget"
        assert a.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 128})[0] == 200
        for lo in range(0, 20_000, 2_000):
            items = [{"id": str(i), "vector": x[i].tolist(), "metadata": {"g": i % 5}}
                     for i in range(lo, lo + 2_000)]
            assert a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})[0] == 200
        assert a.post("/v1/vectors/delete", {"index_name": name, "index_key": key,
                                             "ids": [str(i) for i in range(0, 20_000, 7)]})[0] == 200
        assert a.post("/v1/indexes/train", {"index_name": name, "index_key": key, "n_lists": 64})[0] == 200
        got = []
        for v in q:
            for body in ({}, {"filters": {"g": {"$in": [1, 3]}}}):
                st, b = a.post("/v1/vectors/query", {"index_name": name, "index_key": key, "top_k": 20,
                                                     "query_vectors": v.tolist(),
                                                     "include": ["distance", "metadata"], **body})
                assert st == 200
                got.append(b["results"])
        st, b = a.post("/v1/vectors/query", {"index_name": name, "index_key": key, "top_k": 5,
                                             "query_vectors": q.tolist()})
        assert st == 200
        got.append(b["results"])
        st, b = a.post("/v1/vectors/get", {"index_name": name, "index_key": key,
                                           "ids": [str(i) for i in range(0, 20_000, 97)],
                                           "include": ["vector", "metadata"]})
        assert st == 200
        got.append(b["results"])
        st, b = a.post("/v1/vectors/list_ids", {"index_name": name, "index_key": key})
        assert st == 200 and b["count"] == 20_000 - len(range(0, 20_000, 7))
        got.append(sorted(b["ids"]))
        answers.append(got)
    assert answers[0] == answers[1]
    text = requests.get(small.url + "/metrics", timeout=10).text
    f = {m.name: m for m in text_string_to_metric_families(text)}
    budget = f["sealdb_block_cache_budget_bytes"].samples[0].value
    assert budget == 2 << 20
    assert f["sealdb_block_cache_bytes"].samples[0].value <= budget
    assert f["sealdb_block_cache_misses"].samples[0].value > 0
