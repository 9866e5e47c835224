"""The official CyborgDB Python client (0.18.0 and 0.17.0), unchanged, against our server."""
import re

import cyborgdb
import numpy as np
import pytest


def status_of(exc):
    """0.18 raises CyborgDBError subclasses with .status_code; 0.17 raises ValueError '(NNN)'."""
    code = getattr(exc, "status_code", None)
    if code:
        return int(code)
    m = re.search(r"\((\d{3})\)", str(exc))
    return int(m.group(1)) if m else None


def expect_status(code, fn, *a, **kw):
    with pytest.raises(Exception) as ei:
        fn(*a, **kw)
    assert status_of(ei.value) == code, repr(ei.value)
    return ei.value


@pytest.fixture(scope="module")
def client(server):
    return cyborgdb.Client(server.url)


def test_health_and_lifecycle(client):
    assert client.get_health()["status"] == "healthy"
    key = client.generate_key()
    ix = client.create_index("life", key, dimension=3)
    assert "life" in client.list_indexes()
    expect_status(409, client.create_index, "life", key, dimension=3)
    loaded = client.load_index("life", key)
    assert loaded.dimension == 3 and loaded.metric == "euclidean" and loaded.n_lists == 1
    assert loaded.is_trained() is False
    ix.delete_index()
    assert "life" not in client.list_indexes()
    expect_status(404, client.load_index, "life", key)


def test_wrong_and_missing_key(client):
    key = client.generate_key()
    ix = client.create_index("keys", key, dimension=2)
    ix.upsert([{"id": "a", "vector": [1, 2]}])
    expect_status(401, client.load_index, "keys", client.generate_key())
    # An index handle carrying a wrong key, built the way load_index builds one.
    from cyborgdb.client.encrypted_index import EncryptedIndex
    handle = EncryptedIndex("keys", client.generate_key(), client.api, client.api_client)
    expect_status(401, handle.query, query_vectors=[1, 2])
    expect_status(401, handle.upsert, [{"id": "b", "vector": [1, 1]}])
    expect_status(401, handle.get, ["a"])
    expect_status(401, handle.list_ids)
    nokey = EncryptedIndex("keys", None, client.api, client.api_client)
    expect_status(401, nokey.list_ids)
    assert ix.list_ids() == ["a"]


@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_data_workflow(client, metric, precision):
    name = f"flow-{metric}-{precision}"
    key = client.generate_key()
    ix = client.create_index(name, key, dimension=4, metric=metric, storage_precision=precision)
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(50, 4)).astype(np.float32)
    ix.upsert([{"id": f"j{i}", "vector": vecs[i].tolist(), "metadata": {"i": i, "even": i % 2 == 0,
               "tags": ["t%d" % (i % 3)], "nested": {"v": i}}, "contents": f"doc {i}"} for i in range(25)])
    ix.upsert([f"j{i}" for i in range(25, 50)], vecs[25:])
    assert sorted(ix.list_ids()) == sorted(f"j{i}" for i in range(50))
    got = ix.get(["j3", "j30", "missing"])
    assert [g["id"] for g in got] == ["j3", "j30"]
    assert got[0]["contents"] == "doc 3" and got[0]["metadata"]["nested"] == {"v": 3}
    assert got[1]["contents"] == "" and got[1]["metadata"] == {}
    tol = 1e-2 if precision == "float16" else 1e-6
    assert np.allclose(got[0]["vector"], vecs[3], atol=tol)
    # Exact neighbours for comparison.
    q = vecs[7]
    if metric == "cosine":
        d = 1 - (vecs @ q) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(q))
    else:
        d = ((vecs - q) ** 2).sum(1)
        if metric == "euclidean":
            d = np.sqrt(d)
    order = [f"j{i}" for i in np.argsort(d)[:5]]
    res = ix.query(query_vectors=q.tolist(), top_k=5, include=["distance", "metadata"])
    assert [r["id"] for r in res] == order
    assert all(a["distance"] <= b["distance"] for a, b in zip(res, res[1:]))
    assert np.allclose([r["distance"] for r in res], np.sort(d)[:5], atol=max(tol * 10, 1e-4))
    assert res[0]["metadata"]["i"] == 7
    # Default include: ids (no distance/metadata requested).
    res = ix.query(query_vectors=q.tolist(), top_k=3)
    assert [r["id"] for r in res] == order[:3]
    # Batch (2-D list) and binary (ndarray) queries give one list per query.
    res = ix.query(query_vectors=[vecs[7].tolist(), vecs[9].tolist()], top_k=1)
    assert [r[0]["id"] for r in res] == ["j7", "j9"]
    res = ix.query(query_vectors=vecs[[7, 9]], top_k=1)
    assert [r[0]["id"] for r in res] == ["j7", "j9"]
    # Filters through the client.
    res = ix.query(query_vectors=q.tolist(), top_k=50, filters={"even": True, "i": {"$lt": 10}})
    assert sorted(r["id"] for r in res) == sorted(f"j{i}" for i in range(0, 10, 2))
    res = ix.query(query_vectors=q.tolist(), top_k=50, filters={"$or": [{"tags": "t1"}, {"nested.v": {"$gte": 23}}]})
    want = {f"j{i}" for i in range(25) if i % 3 == 1 or i >= 23}
    assert {r["id"] for r in res} == want
    ix.delete(["j7"])
    assert "j7" not in {r["id"] for r in ix.query(query_vectors=q.tolist(), top_k=5)}
    assert ix.get(["j7"]) == []
    assert len(ix.list_ids()) == 49
    ix.delete_index()


def test_training_20k_recall(client):
    dim, n = 32, 20_000
    rng = np.random.default_rng(7)
    centres = rng.normal(scale=3.0, size=(64, dim)).astype(np.float32)
    data = (centres[rng.integers(0, 64, n)] + rng.normal(size=(n, dim))).astype(np.float32)
    queries = (centres[rng.integers(0, 64, 200)] + rng.normal(size=(200, dim))).astype(np.float32)
    key = client.generate_key()
    ix = client.create_index("train20k", key, dimension=dim)
    ids = [str(i) for i in range(n)]
    for s in range(0, n, 2000):
        ix.upsert(ids[s:s + 2000], data[s:s + 2000])
    ix.train()
    assert ix.is_trained() and ix.n_lists > 1
    # Every vector finds itself first.
    for s in range(0, n, 2000):
        res = ix.query(query_vectors=data[s:s + 2000], top_k=1)
        assert [r[0]["id"] for r in res] == ids[s:s + 2000]
    # recall@10 against exact search.
    d = ((queries[:, None, :] - data[None, :, :]) ** 2).sum(-1)
    exact = np.argsort(d, axis=1)[:, :10]
    res = ix.query(query_vectors=queries, top_k=10)
    hits = sum(len({int(r["id"]) for r in row} & set(exact[i].tolist())) for i, row in enumerate(res))
    assert hits / (200 * 10) >= 0.95
    ix.delete_index()


def test_restart_and_reload(make_server):
    s = make_server(name="client-restart")
    c = cyborgdb.Client(s.url)
    key = c.generate_key()
    ix = c.create_index("persist", key, dimension=2, metric="cosine", storage_precision="float16")
    ix.upsert([{"id": "a", "vector": [1, 0], "contents": "kept", "metadata": {"m": 1}}])
    s.restart()
    c = cyborgdb.Client(s.url)
    ix = c.load_index("persist", key)
    assert ix.metric == "cosine" and ix.dimension == 2
    assert ix.get(["a"])[0]["contents"] == "kept"
    expect_status(401, c.load_index, "persist", c.generate_key())


@pytest.mark.skipif(not hasattr(cyborgdb.EncryptedIndex, "query_metadata")
                    if hasattr(cyborgdb, "EncryptedIndex") else True,
                    reason="query_metadata is a 0.18 client method")
def test_query_metadata_through_the_client(client):
    """0.18's metadata-only queries, answered as cyborgdb-service 0.18.0 answers them on the
    same items (order_by, direction, top_k, the 400 cases), on an untrained index."""
    key = client.generate_key()
    ix = client.create_index(index_name=f"qm-{np.random.randint(1 << 30)}", index_key=key, dimension=2)
    ix.upsert([
        {"id": "a", "vector": [1, 0], "metadata": {"y": 3, "s": "b", "g": "x"}},
        {"id": "b", "vector": [0, 1], "metadata": {"y": 1, "s": "a", "g": "x"}},
        {"id": "c", "vector": [1, 1], "metadata": {"y": "str", "g": "z"}},
        {"id": "d", "vector": [0.5, 0.5], "metadata": {"y": 2.5, "s": ["q"]}},
        {"id": "e", "vector": [0.5, 0.2]},
    ])

    def ids(**kw):
        return [r["id"] if isinstance(r, dict) else r.id for r in ix.query_metadata(**kw)]

    assert sorted(ids()) == list("abcde")
    assert sorted(ids(filters={"g": "x"})) == ["a", "b"]
    assert ids(order_by="y") == list("bdace")
    assert ids(order_by="y", ascending=False) == list("cadbe")
    assert ids(order_by={"y": -1}) == list("cadbe")
    assert ids(order_by={"y": 1}, top_k=2) == ["b", "d"]
    assert ids(filters={"y": {"$gt": 2}}, order_by="y") == ["d", "a"]
    assert sorted(ids(filters={"$or": [{"g": "z"}, {"y": 1}]})) == ["b", "c"]
    for kw in [{"filters": {"s": {"$regex": "a"}}}, {"filters": {"g": {"$type": "string"}}},
               {"text": "hello"}]:
        expect_status(400, ix.query_metadata, **kw)
    ix.delete_index()



@pytest.mark.skipif(not hasattr(cyborgdb.EncryptedIndex, "query_metadata")
                    if hasattr(cyborgdb, "EncryptedIndex") else True,
                    reason="metadata_schema is 0.18")
def test_metadata_schema_value_index_and_key_order_through_the_client(client):
    """metadata_schema at create and on the loaded index; filters on a declared field are
    answered from the value index (query_metadata and vector query agree with a plain
    filter); metadata comes back in the key order it was written."""
    key = client.generate_key()
    name = f"schema-{np.random.randint(1 << 30)}"
    ix = client.create_index(index_name=name, index_key=key, dimension=2,
                             metadata_schema={"cat": {"filterable": True}, "note": {"filterable": False},
                                              "city": {"pattern": True}})
    rng = np.random.default_rng(8)
    items = [{"id": f"i{i}", "vector": rng.random(2).tolist(),
              "metadata": {"zeta": i, "cat": i % 7, "alpha": "x", "city": ["Oslo", "Paris"][i % 2],
                           "note": "n"}} for i in range(300)]
    ix.upsert(items)
    ix.upsert([{"id": "i0", "vector": [0.0, 0.0], "metadata": {"cat": 99, "city": "Rome"}}])
    ix.delete(["i7"])
    loaded = client.load_index(name, key)
    assert loaded.metadata_schema["cat"] == {"filterable": True, "pattern": False, "full_text": False}
    assert loaded.metadata_schema["note"]["filterable"] is False
    want = sorted(f"i{i}" for i in range(300) if i % 7 == 3)
    assert sorted(r["id"] for r in ix.query_metadata(filters={"cat": 3})) == want
    assert sorted(r["id"] for r in ix.query_metadata(filters={"cat": {"$in": [3, 99]}})) == sorted(want + ["i0"])
    # i0 was overwritten with another cat, i7 deleted: the index follows both.
    assert sorted(r["id"] for r in ix.query_metadata(filters={"cat": 0})) == sorted(
        f"i{i}" for i in range(14, 300, 7))
    assert sorted(r["id"] for r in ix.query_metadata(filters={"cat": 0, "zeta": {"$gt": 100}})) == sorted(
        f"i{i}" for i in range(101, 300) if i % 7 == 0)
    assert [r["id"] for r in ix.query_metadata(filters={"city": {"$regex": "^Ro"}})] == ["i0"]
    expect_status(400, ix.query_metadata, filters={"note": "n"})
    hits = ix.query(query_vectors=[0.0, 0.0], top_k=5, filters={"cat": 3}, include=["metadata"])
    assert len(hits) == 5 and all(h["metadata"]["cat"] == 3 for h in hits)
    got = ix.get(["i5"], include=["metadata"])[0]["metadata"]
    assert list(got) == ["zeta", "cat", "alpha", "city", "note"]
    ix.delete_index()

TEXT_DOCS = [
    ("a", [1.0, 0.0], {"title": "The quick brown fox", "body": "Foxes are running quickly through the forest", "k": 1}),
    ("b", [0.9, 0.1], {"title": "Lazy dogs sleeping", "body": "The dog sleeps with this fox all day", "k": 2}),
    ("c", [0.5, 0.5], {"title": "Running shoes", "body": "Best running shoes for runners and joggers, running daily", "k": 1}),
    ("d", [0.0, 1.0], {"title": "Fox News", "body": "news about the world", "k": 2}),
    ("e", [0.2, 0.8], {"title": "Quickly quick quicker", "body": "quickest", "k": 1}),
]


@pytest.mark.skipif(not hasattr(cyborgdb.EncryptedIndex, "query_metadata")
                    if hasattr(cyborgdb, "EncryptedIndex") else True,
                    reason="BM25 and hybrid search are 0.18 client methods")
def test_bm25_and_hybrid_search_through_the_client(client):
    """0.18's full-text search through the client's own methods: text_fields and bm25 at
    create, describe's bm25, query_metadata(text=...) with the scores cyborgdb-service
    0.18.0 returns on the same documents, and hybrid query/query_binary with alpha,
    rrf_k and window_mult."""
    key = client.generate_key()
    name = f"bm25-{np.random.randint(1 << 30)}"
    ix = client.create_index(index_name=name, index_key=key, dimension=2, text_fields=["title", "body"])
    ix.upsert([{"id": i, "vector": v, "metadata": m} for i, v, m in TEXT_DOCS])
    loaded = client.load_index(name, key)
    assert loaded.metadata_schema["title"]["full_text"] is True
    assert loaded.metadata_schema["title"]["filterable"] is False
    assert loaded.bm25["k1"] == 1.2 and loaded.bm25["b"] == 0.75 and loaded.bm25["analyzer_version"]

    def text(**kw):
        return [(r["id"], round(r["score"], 5)) for r in ix.query_metadata(**kw)]

    # Scores as the original returns them on these documents (probed on 0.18.0).
    assert text(text="fox") == [("a", 1.63581), ("d", 0.96673), ("b", 0.81218)]
    assert text(text="running") == [("c", 2.54451), ("a", 0.81218)]
    assert text(text="quick fox") == [("a", 3.74553), ("e", 1.15384), ("d", 0.96673), ("b", 0.81218)]
    assert text(text="quick fox", require_all_terms=True) == [("a", 3.74553)]
    assert text(text="fox", text_fields=["title"]) == [("d", 0.96673), ("a", 0.82363)]
    # Without text_fields, weights go to the full_text fields in name order (body, title).
    assert text(text="fox", text_field_weights=[2.0, 1.0]) == [("a", 2.448), ("b", 1.62436), ("d", 0.96673)]
    assert text(text="fox", text_fields=["title", "body"], text_field_weights=[2.0, 1.0]) == [
        ("a", 2.45945), ("d", 1.93347), ("b", 0.81218)]
    assert text(text="with this the") == []
    assert text(text="fox", filters={"k": 2}) == [("d", 0.96673), ("b", 0.81218)]
    assert text(text="fox", top_k=1) == [("a", 1.63581)]
    for kw in [{"text": "fox", "order_by": "k"}, {"text": "fox", "text_fields": ["k"]},
               {"text": "fox", "text_field_weights": [1.0]}, {"text": "fox", "filters": {"title": "Fox News"}}]:
        expect_status(400, ix.query_metadata, **kw)

    # Hybrid: weighted reciprocal rank fusion of the vector and the text ranking.
    hits = ix.query(query_vectors=[1.0, 0.0], top_k=3, text="fox")
    assert [h["id"] for h in hits] == ["a", "b", "d"]
    assert abs(hits[0]["score"] - 1 / 61) < 1e-6 and "distance" not in hits[0]
    only_text = ix.query(query_vectors=[1.0, 0.0], top_k=3, text="fox", alpha=0.0)
    assert [h["id"] for h in only_text] == ["a", "d", "b"]
    only_vec = ix.query(query_vectors=[1.0, 0.0], top_k=3, text="fox", alpha=1.0, rrf_k=10)
    assert [h["id"] for h in only_vec] == ["a", "b", "c"] and abs(only_vec[1]["score"] - 1 / 12) < 1e-6
    narrow = ix.query(query_vectors=[1.0, 0.0], top_k=2, text="running", window_mult=1,
                      include=["metadata"])
    assert [h["id"] for h in narrow] == ["a", "c"] and narrow[1]["metadata"]["k"] == 1
    binary = ix.query_binary(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32), top_k=2, text="fox")
    assert [[h["id"] for h in row] for row in binary] == [["a", "b"], ["d", "a"]]
    batch = ix.query(query_vectors=[[1.0, 0.0], [0.0, 1.0]], top_k=2, text="fox")
    assert [[(h["id"], h["score"]) for h in row] for row in batch] == [
        [(h["id"], h["score"]) for h in row] for row in binary]
    expect_status(400, ix.query, query_vectors=[1.0, 0.0], text="fox", alpha=2.0)
    expect_status(400, ix.query, query_vectors=[1.0, 0.0], text="fox", rrf_k=0)
    plain = client.create_index(index_name=name + "-plain", index_key=key, dimension=2)
    plain.upsert([{"id": "x", "vector": [1.0, 0.0], "metadata": {"title": "fox"}}])
    expect_status(400, plain.query, query_vectors=[1.0, 0.0], text="fox")
    expect_status(400, plain.query_metadata, text="fox")
    plain.delete_index()
    ix.delete_index()


@pytest.mark.skipif(not hasattr(cyborgdb.EncryptedIndex, "query_metadata")
                    if hasattr(cyborgdb, "EncryptedIndex") else True,
                    reason="the tq storage precisions are 0.18")
@pytest.mark.parametrize("precision", ["tq12", "tq8", "tq6", "tq4"])
def test_quantized_storage_through_the_client(client, precision):
    key = client.generate_key()
    ix = client.create_index(index_name=f"{precision}-{np.random.randint(1 << 30)}", index_key=key,
                             dimension=32, storage_precision=precision)
    vecs = np.random.default_rng(2).standard_normal((60, 32)).astype(np.float32)
    ix.upsert([{"id": str(i), "vector": v.tolist()} for i, v in enumerate(vecs)])
    got = np.array(ix.get(["3"], include=["vector"])[0]["vector"])
    err = float(np.linalg.norm(got - vecs[3]) / np.linalg.norm(vecs[3]))
    assert 0 < err < {"tq12": 0.002, "tq8": 0.02, "tq6": 0.06, "tq4": 0.2}[precision]
    hits = ix.query(query_vectors=got.tolist(), top_k=1, include=["distance"])
    assert hits[0]["id"] == "3" and hits[0]["distance"] < 1e-6
    ix.delete_index()
