"""Black-box tests of the REST API over plain HTTP against a real server process."""
import base64
import json
import math
import struct

import pytest
import requests

from conftest import Api, new_key, unique


def create(api, dim=3, metric=None, precision=None, name=None, key=None):
    name = name or unique()
    key = key or new_key()
    body = {"index_name": name, "index_key": key, "dimension": dim}
    if metric:
        body["metric"] = metric
    if precision:
        body["storage_precision"] = precision
    st, b = api.post("/v1/indexes/create", body)
    assert st == 200, b
    return name, key


def assert_error(st, body, want):
    assert st == want, body
    assert body["status_code"] == want
    assert isinstance(body["detail"], str) and body["detail"]


def b64(rows):
    return base64.b64encode(b"".join(struct.pack("<%df" % len(r), *r) for r in rows)).decode()


def test_health(api):
    st, b = api.get("/v1/health")
    assert st == 200 and b["status"] == "healthy" and b["api_version"] == "v1" and b["version"]


def test_create_messages_and_errors(api):
    name, key = create(api)
    st, b = api.post("/v1/indexes/create", {"index_name": name, "index_key": new_key()})
    assert_error(st, b, 409)
    st, b = api.post("/v1/indexes/create", {"index_name": unique(), "index_key": key, "kms_name": "x"})
    assert_error(st, b, 400)
    assert "exactly one" in b["detail"] or "mutually exclusive" in b["detail"]
    st, b = api.post("/v1/indexes/create", {"index_name": unique(), "index_key": None, "kms_name": None})
    assert_error(st, b, 400)
    st, b = api.post("/v1/indexes/create", {"index_name": unique(), "kms_name": "nosuchslot"})
    assert_error(st, b, 400)
    assert "nosuchslot" in b["detail"]
    st, b = api.post("/v1/indexes/create", {"index_name": unique(), "index_key": "ab" * 16})
    assert_error(st, b, 400)
    assert "32 bytes" in b["detail"] and "ab" * 16 not in b["detail"]
    st, b = api.post("/v1/indexes/create", {"index_name": unique(), "index_key": new_key(), "metric": "manhattan"})
    assert_error(st, b, 422)
    st, b = api.post("/v1/indexes/create", {"index_name": unique(), "index_key": new_key(), "storage_precision": "int8"})
    assert_error(st, b, 422)
    st, b = api.post("/v1/indexes/create", {"index_name": unique(), "index_key": new_key(), "dimension": -3})
    assert_error(st, b, 422)
    st, b = api.post("/v1/indexes/create", {"index_name": "default", "index_key": new_key()})
    assert_error(st, b, 400)
    st, b = api.post("/v1/indexes/create", {"index_key": new_key()})
    assert_error(st, b, 422)
    # Success body exactly as documented; null optional fields and unknown fields are fine.
    n = unique()
    st, b = api.post("/v1/indexes/create", {"index_name": n, "index_key": new_key(), "dimension": None,
                                            "metric": None, "embedding_model": None, "kms_name": None,
                                            "storage_precision": None, "some_future_field": 1})
    assert st == 200 and b == {"status": "success", "message": f"Index '{n}' created successfully"}
    st, b = api.get("/v1/indexes/list")
    assert st == 200 and n in b["indexes"] and name in b["indexes"]


def test_keys_wrong_missing_unknown_index(api):
    name, key = create(api)
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [{"id": "a", "vector": [1, 2, 3]}]})
    for path, extra in [("/v1/indexes/describe", {}), ("/v1/vectors/upsert", {"items": [{"id": "b", "vector": [1, 1, 1]}]}),
                        ("/v1/vectors/get", {"ids": ["a"]}), ("/v1/vectors/query", {"query_vectors": [1, 2, 3]}),
                        ("/v1/vectors/delete", {"ids": ["a"]}), ("/v1/indexes/delete", {}),
                        ("/v1/indexes/train", {}), ("/v1/vectors/list_ids", {}), ("/v1/vectors/num_vectors", {})]:
        st, b = api.post(path, {"index_name": name, "index_key": new_key(), **extra})
        assert_error(st, b, 401)
        assert b["detail"] == f"Wrong encryption key for index '{name}'"
        st, b = api.post(path, {"index_name": name, **extra})
        assert_error(st, b, 401)
        st, b = api.post(path, {"index_name": unique("missing"), "index_key": key, **extra})
        assert_error(st, b, 404)
    # Wrong keys had no side effects.
    st, b = api.post("/v1/vectors/list_ids", {"index_name": name, "index_key": key})
    assert b == {"ids": ["a"], "count": 1}


def test_dimension_inferred_and_enforced_atomically(api):
    name, key = create(api, dim=None)
    st, b = api.post("/v1/indexes/describe", {"index_name": name, "index_key": key})
    assert st == 200 and b["dimension"] == 0 and b["n_lists"] == 1 and b["is_trained"] is False
    st, b = api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                            "items": [{"id": "a", "vector": [1, 2]}, {"id": "b", "vector": [3, 4]}]})
    assert st == 200 and b["message"] == "Upserted 2 vectors"
    st, b = api.post("/v1/indexes/describe", {"index_name": name, "index_key": key})
    assert b["dimension"] == 2 and b["metric"] == "euclidean" and b["index_name"] == name
    st, b = api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                            "items": [{"id": "c", "vector": [1, 2]}, {"id": "a", "vector": [1, 2, 3]}]})
    assert_error(st, b, 422)
    assert "dimension" in b["detail"]
    st, b = api.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["a", "c"]})
    assert [r["id"] for r in b["results"]] == ["a"] and b["results"][0]["vector"] == [1, 2]


def test_upsert_get_overwrite_delete(api):
    name, key = create(api)
    items = [{"id": "a", "vector": [1, 0, 0], "metadata": {"k": "v", "n": {"x": 1}}, "contents": "alpha \u00e9 \"q\""},
             {"id": "b", "vector": [0, 1, 0], "metadata": None, "contents": None},
             {"id": "c", "vector": [0, 0, 1]}]
    st, b = api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})
    assert st == 200 and b["status"] == "success"
    st, b = api.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["c", "zz", "a", "b"]})
    assert st == 200
    assert b["results"] == [
        {"id": "c", "vector": [0, 0, 1], "contents": "", "metadata": {}},
        {"id": "a", "vector": [1, 0, 0], "contents": "alpha \u00e9 \"q\"", "metadata": {"k": "v", "n": {"x": 1}}},
        {"id": "b", "vector": [0, 1, 0], "contents": "", "metadata": {}},
    ]
    st, b = api.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["a"], "include": ["metadata"]})
    assert b["results"] == [{"id": "a", "metadata": {"k": "v", "n": {"x": 1}}}]
    # Overwrite replaces vector, metadata and contents.
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                    "items": [{"id": "a", "vector": [5, 5, 5], "metadata": {"k": "w"}}]})
    st, b = api.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["a"]})
    assert b["results"] == [{"id": "a", "vector": [5, 5, 5], "contents": "", "metadata": {"k": "w"}}]
    st, b = api.post("/v1/vectors/num_vectors", {"index_name": name, "index_key": key})
    assert st == 200 and b["result"] == 3
    st, b = api.post("/v1/vectors/delete", {"index_name": name, "index_key": key, "ids": ["a", "nope"]})
    assert st == 200 and b["message"] == "Deleted 1 vectors"
    st, b = api.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["a"]})
    assert b["results"] == []
    st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": [5, 5, 5]})
    assert "a" not in [r["id"] for r in b["results"]]
    st, b = api.post("/v1/vectors/list_ids", {"index_name": name, "index_key": key})
    assert sorted(b["ids"]) == ["b", "c"] and b["count"] == 2


def test_binary_upsert_and_query(api):
    name, key = create(api, dim=2)
    rows = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
    st, b = api.post("/v1/vectors/upsert_binary", {"index_name": name, "index_key": key, "batch": {
        "ids": ["o", "x", "y"], "vectors_b64": b64(rows), "dimension": 2,
        "metadata": [{"m": 1}, None, {"m": 3}], "contents": ["zero", None, "two"]}})
    assert st == 200, b
    st, b = api.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["y", "x"]})
    assert b["results"] == [{"id": "y", "vector": [0, 2], "contents": "two", "metadata": {"m": 3}},
                            {"id": "x", "vector": [1, 0], "contents": "", "metadata": {}}]
    st, b = api.post("/v1/vectors/query_binary", {"index_name": name, "index_key": key, "top_k": 2,
                                                  "batch": {"vectors_b64": b64([[0.9, 0.0]]), "dimension": 2},
                                                  "include": ["distance"]})
    assert st == 200
    assert [r["id"] for r in b["results"][0]] == ["x", "o"]
    assert b["results"][0][0]["distance"] == pytest.approx(0.1, abs=1e-6)
    # Mismatched ids and vectors: nothing written.
    st, b = api.post("/v1/vectors/upsert_binary", {"index_name": name, "index_key": key, "batch": {
        "ids": ["p", "q"], "vectors_b64": b64([[1.0, 1.0]]), "dimension": 2}})
    assert_error(st, b, 422)
    st, b = api.post("/v1/vectors/upsert_binary", {"index_name": name, "index_key": key, "batch": {
        "ids": ["p"], "vectors_b64": "!!notbase64", "dimension": 2}})
    assert_error(st, b, 422)
    st, b = api.post("/v1/vectors/num_vectors", {"index_name": name, "index_key": key})
    assert b["result"] == 3


@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean", "cosine"])
def test_query_shapes_and_metric_distances(api, metric):
    name, key = create(api, dim=2, metric=metric)
    vecs = {"a": [1.0, 0.0], "b": [3.0, 4.0], "c": [-1.0, 1.0], "d": [0.5, 0.1]}
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                    "items": [{"id": k, "vector": v, "metadata": {"id": k}} for k, v in vecs.items()]})
    q = [2.0, 1.0]

    def dist(v):
        if metric == "cosine":
            dot = sum(x * y for x, y in zip(q, v))
            return 1 - dot / (math.hypot(*q) * math.hypot(*v))
        sq = sum((x - y) ** 2 for x, y in zip(q, v))
        return math.sqrt(sq) if metric == "euclidean" else sq

    want = sorted(vecs, key=lambda k: dist(vecs[k]))
    # Default include: ids only, flat list for one vector.
    st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": q})
    assert st == 200 and b["results"] == [{"id": k} for k in want]
    st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": q,
                                           "include": ["distance", "metadata", "vector"], "top_k": 3})
    assert [r["id"] for r in b["results"]] == want[:3]
    for r in b["results"]:
        assert r["distance"] == pytest.approx(dist(vecs[r["id"]]), abs=1e-5)
        assert r["metadata"] == {"id": r["id"]} and r["vector"] == vecs[r["id"]]
    # A 2-D query gives one list per query.
    st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key,
                                           "query_vectors": [q, [0.0, 1.0]], "top_k": 1})
    assert st == 200 and len(b["results"]) == 2 and b["results"][0] == [{"id": want[0]}]
    describe = api.post("/v1/indexes/describe", {"index_name": name, "index_key": key})[1]
    assert describe["metric"] == metric


def test_query_validation(api):
    name, key = create(api, dim=2)
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [{"id": "a", "vector": [1, 1]}]})
    for body in [{"query_vectors": [1, 2, 3]}, {}, {"query_vectors": [1, 2], "top_k": 0},
                 {"query_vectors": [1, 2], "include": ["bogus"]}, {"query_vectors": [1, 2], "filters": {"$or": 1}},
                 {"query_vectors": [1, 2], "n_probes": -1}, {"query_contents": "text"}]:
        st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key, **body})
        assert_error(st, b, 422)


def test_filters(api):
    name, key = create(api, dim=2)
    docs = [
        {"genre": "rock", "year": 1990, "tags": ["a", "b"], "nested": {"v": 1}, "live": True},
        {"genre": "jazz", "year": 2005, "tags": ["b"], "nested": {"v": 2}, "live": False},
        {"genre": "rock", "year": 2015, "tags": [], "nested": {"v": 3}},
        {"genre": "pop", "year": 2021},
    ]
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                    "items": [{"id": str(i), "vector": [float(i), 0.0], "metadata": d} for i, d in enumerate(docs)]})

    def ids(f):
        st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": [0, 0], "filters": f})
        assert st == 200, b
        return sorted(r["id"] for r in b["results"])

    assert ids({"genre": "rock"}) == ["0", "2"]
    assert ids({"genre": {"$eq": "jazz"}}) == ["1"]
    assert ids({"genre": {"$ne": "rock"}}) == ["1", "3"]
    assert ids({"year": {"$gt": 2005}}) == ["2", "3"]
    assert ids({"year": {"$gte": 2005, "$lt": 2021}}) == ["1", "2"]
    assert ids({"year": {"$lte": 1990}}) == ["0"]
    assert ids({"genre": {"$in": ["pop", "jazz"]}}) == ["1", "3"]
    assert ids({"genre": {"$nin": ["pop", "jazz"]}}) == ["0", "2"]
    assert ids({"live": {"$exists": True}}) == ["0", "1"]
    assert ids({"live": {"$exists": False}}) == ["2", "3"]
    assert ids({"tags": "b"}) == ["0", "1"]
    assert ids({"nested.v": {"$gte": 2}}) == ["1", "2"]
    assert ids({"$and": [{"genre": "rock"}, {"year": {"$gt": 2000}}]}) == ["2"]
    assert ids({"$or": [{"genre": "pop"}, {"live": False}]}) == ["1", "3"]
    assert ids({"$not": {"genre": "rock"}}) == ["1", "3"]
    assert ids({"genre": "rock", "live": True}) == ["0"]


def test_metadata_keeps_key_order_and_nulls_filter_as_the_original(api):
    """Expected answers are what cyborgdb-service 0.18.0 gives on the same items: metadata keys
    come back in the order written, and null, objects and null-only lists are no value."""
    name, key = create(api, dim=2)
    docs = {
        "a": {"zeta": 1, "alpha": 2, "mid": {"y": 1, "b": None}, "n": None, "l": ["x", None]},
        "b": {"alpha": 3, "n": 5, "l": ["y", "x"]},
        "c": {"other": True, "l": [], "mid": {"y": 2}},
        "d": {"n": "str", "alpha": None, "mid": None, "l": [None]},
    }
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [
        {"id": i, "vector": [float(k), 1.0], "metadata": m} for k, (i, m) in enumerate(docs.items())]})
    st, b = api.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["a"],
                                         "include": ["metadata"]})
    assert st == 200
    got = b["results"][0]["metadata"]
    assert list(got) == ["zeta", "alpha", "mid", "n", "l"] and list(got["mid"]) == ["y", "b"]
    st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": [0, 1],
                                           "top_k": 1, "include": ["metadata"]})
    assert list(b["results"][0]["metadata"]) == ["zeta", "alpha", "mid", "n", "l"]

    def ids(f):
        st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key,
                                               "query_vectors": [0, 1], "filters": f, "include": []})
        assert st == 200, b
        return "".join(sorted(r["id"] for r in b["results"]))

    for f, want in [({"n": None}, ""), ({"n": {"$ne": None}}, "bd"), ({"n": {"$exists": False}}, "ac"),
                    ({"n": {"$in": [None, 5]}}, "b"), ({"n": {"$nin": [None]}}, "abcd"),
                    ({"alpha": {"$ne": 2}}, "b"), ({"$nor": [{"n": None}]}, "abcd"),
                    ({"mid": {"$exists": True}}, ""), ({"mid.y": {"$ne": 1}}, "c"),
                    ({"l": {"$ne": "x"}}, ""), ({"l": {"$exists": True}}, "ab"),
                    ({"n": {"$type": "null"}}, "a")]:
        assert ids(f) == want, f


def test_query_metadata_over_http(api):
    name, key = create(api, dim=2)
    items = [{"id": f"i{k:03}", "vector": [float(k), 1.0], "metadata": {"rank": (k * 37) % 101, "odd": k % 2}}
             for k in range(300)]
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})

    def qm(**body):
        return api.post("/v1/vectors/query_metadata", {"index_name": name, "index_key": key, **body})

    st, b = qm(filters={"odd": 1}, order_by={"rank": -1}, top_k=5)
    assert st == 200 and b["count"] == 5 and b["ids"] == [r["id"] for r in b["results"]]
    want = sorted((it for it in items if it["metadata"]["odd"] == 1),
                  key=lambda it: (-it["metadata"]["rank"], it["id"]))[:5]
    assert b["ids"] == [it["id"] for it in want]
    assert all("score" not in r for r in b["results"])
    st, b = qm()
    assert st == 200 and b["count"] == 300
    # The same before and after a training (the metadata path reads every block either way).
    assert api.post("/v1/indexes/train", {"index_name": name, "index_key": key, "n_lists": 4})[0] == 200
    st, b2 = qm(filters={"odd": 1}, order_by={"rank": -1}, top_k=5)
    assert b2["ids"] == [it["id"] for it in want]
    assert qm(order_by={"rank": 1, "odd": 1})[0] == 400
    assert qm(text="anything")[0] == 400
    assert qm(filters={"rank": {"$regex": "1"}})[0] == 400
    assert qm(top_k=-1)[0] == 422
    assert qm(order_by=["rank"])[0] == 422
    assert api.post("/v1/vectors/query_metadata", {"index_name": "nope-" + name, "index_key": key})[0] == 404


def test_metadata_schema_at_create_describe_and_query_metadata(api):
    key = new_key()

    def create_with(schema, **kw):
        return api.post("/v1/indexes/create", {"index_name": unique(), "index_key": key, "dimension": 2,
                                               "metadata_schema": schema, **kw})

    for schema, status in [({"x": {"bogus": True}}, 422), ({"x": True}, 422), ({"": {"pattern": True}}, 422),
                           ({"t": {"full_text": True, "pattern": True}}, 422),
                           ({"t": {"full_text": True, "filterable": True}}, 422),
                           ({"t": {"full_text": True}}, 200), ({"x": {"pattern": 1}}, 422)]:
        assert create_with(schema)[0] == status, schema
    assert create_with({}, text_fields=["t"])[0] == 200
    assert create_with({}, bm25_k1=1.5)[0] == 400          # BM25 parameters need a full_text field
    assert create_with({}, text_fields=["t"], bm25_b=2)[0] == 400
    name = unique()
    st, _ = api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2,
                                            "metadata_schema": {"g": {"filterable": False}, "loc.city": {"pattern": True}}})
    assert st == 200
    st, d = api.post("/v1/indexes/describe", {"index_name": name, "index_key": key})
    assert d["metadata_schema"] == {"g": {"filterable": False, "pattern": False, "full_text": False},
                                    "loc.city": {"filterable": True, "pattern": True, "full_text": False}}
    assert list(d["metadata_schema"]) == ["g", "loc.city"] and d.get("bm25") is None
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [
        {"id": "a", "vector": [1, 0], "metadata": {"g": "x", "loc": {"city": "Paris"}, "h": "q"}},
        {"id": "b", "vector": [0, 1], "metadata": {"g": "y", "loc": {"city": "Oslo"}, "h": "r"}}]})

    def qm(f):
        return api.post("/v1/vectors/query_metadata", {"index_name": name, "index_key": key, "filters": f})

    assert qm({"g": "x"})[0] == 400                       # not filterable here
    assert qm({"loc.city": {"$regex": "^Par"}})[1]["ids"] == ["a"]   # a pattern field
    assert qm({"loc.city": {"$contains": "sl"}})[1]["ids"] == ["b"]
    assert qm({"h": {"$regex": "q"}})[0] == 400           # not a pattern field
    # Vector queries are not held to the schema.
    st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": [1, 0],
                                           "filters": {"g": "x", "h": {"$regex": "q"}}})
    assert st == 200 and [r["id"] for r in b["results"]] == ["a"]
    st, d = api.post("/v1/indexes/describe", {"index_name": unique("none"), "index_key": key})
    assert st == 404


def test_filtered_query_fills_top_k(api):
    # Only every 10th item matches; a filtered query must still return top_k matches.
    name, key = create(api, dim=2)
    items = [{"id": str(i), "vector": [float(i % 50), float(i // 50)], "metadata": {"keep": i % 10 == 0}} for i in range(500)]
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})
    st, b = api.post("/v1/indexes/train", {"index_name": name, "index_key": key, "n_lists": 16})
    assert st == 200
    st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": [0, 0],
                                           "top_k": 40, "n_probes": 1, "filters": {"keep": True},
                                           "include": ["metadata"]})
    assert st == 200 and len(b["results"]) == 40
    assert all(r["metadata"]["keep"] for r in b["results"])


def test_float16_rounds_vectors(api):
    name, key = create(api, dim=3, precision="float16")
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                    "items": [{"id": "a", "vector": [0.1, 1000.7, -3.3333]}]})
    st, b = api.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["a"]})
    v = b["results"][0]["vector"]
    want = [struct.unpack("<e", struct.pack("<e", x))[0] for x in [0.1, 1000.7, -3.3333]]
    assert v == pytest.approx(want, abs=1e-6) and v != pytest.approx([0.1, 1000.7, -3.3333], abs=1e-5)


def test_train_and_training_status(api):
    name, key = create(api, dim=4)
    import random
    rnd = random.Random(5)
    items = [{"id": str(i), "vector": [rnd.gauss(i % 8, 0.1) for _ in range(4)]} for i in range(800)]
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})
    st, b = api.post("/v1/indexes/train", {"index_name": name, "index_key": key, "n_lists": 8, "max_iters": 20,
                                           "batch_size": 128, "tolerance": 1e-4, "max_memory": 64})
    assert st == 200 and b["message"] == f"Index '{name}' trained successfully"
    st, d = api.post("/v1/indexes/describe", {"index_name": name, "index_key": key})
    assert d["is_trained"] is True and d["n_lists"] == 8
    st, b = api.post("/v1/indexes/train", {"index_name": name, "index_key": key, "n_lists": 1000})
    assert_error(st, b, 422)
    st, s = api.get("/v1/indexes/training-status")
    assert st == 200 and isinstance(s["training_indexes"], list) and isinstance(s["retrain_threshold"], int)
    assert s["worker_pid"] == 0 and s["global_training"] == {} and "queued_indexes" in s


def test_error_bodies_for_routing_and_parsing(api):
    r = requests.get(api.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["status_code"] == 404
    r = requests.post(api.url + "/v1/vectors/query", data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["status_code"] == 422
    r = requests.post(api.url + "/v1/vectors/get", data="{}")
    assert r.status_code == 422 and "Content-Type" in r.json()["detail"]


def test_upsert_bodies_are_parsed_strictly_and_never_echo_keys(api):
    """Both upserts parse their JSON directly (no Value tree); they must accept and reject
    exactly what the schema says, with a 422 in our error format."""
    name, key = unique(), new_key()
    assert api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2})[0] == 200
    base = {"index_name": name, "index_key": key}
    # Nulls and unknown fields are fine; integers are valid floats.
    st, b = api.post("/v1/vectors/upsert", {**base, "extra": 1, "items": [
        {"id": "a", "vector": [1, 2], "contents": None, "metadata": None, "other": True}]})
    assert st == 200, b
    bad = [
        ({**base, "items": [{"id": "a", "vector": [1, "x"]}]}, "f32"),
        ({**base, "items": [{"vector": [1, 2]}]}, "id"),
        ({**base}, "items"),
        ({"index_key": key, "items": []}, "index_name"),
        ({**base, "items": [{"id": "a", "vector": [1, 2], "metadata": [1]}]}, "map"),
        ({"index_name": name, "index_key": 12345, "items": []}, "string"),
    ]
    for body, word in bad:
        st, b = api.post("/v1/vectors/upsert", body)
        assert st == 422 and b["status_code"] == 422 and word in b["detail"], (body, b)
    # A key put where a number belongs is not echoed back.
    st, b = api.post("/v1/vectors/upsert", {**base, "items": [{"id": "a", "vector": [1, key]}]})
    assert st == 422 and key not in b["detail"]
    r = requests.post(api.url + "/v1/vectors/upsert", data=b'{"index_name": "x", "items": [',
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "line 1" in r.json()["detail"]
    r = requests.post(api.url + "/v1/vectors/upsert_binary", data=b"", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    st, b = api.post("/v1/vectors/upsert_binary", {**base, "batch": {"ids": ["a"], "vectors_b64": 7, "dimension": 2}})
    assert st == 422 and "string" in b["detail"]
    st, b = api.post("/v1/vectors/get", {**base, "ids": ["a"], "include": ["vector"]})
    assert st == 200 and b["results"][0]["vector"] == [1, 2]


def test_docs_and_spec_served_offline(api):
    r = requests.get(api.url + "/v1/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()
    assert "<script src=\"http" not in r.text and "cdn" not in r.text.lower()
    r = requests.get(api.url + "/v1/openapi.json")
    assert r.status_code == 200 and "/v1/vectors/query" in r.json()["paths"]


def test_restart_keeps_everything(make_server):
    s = make_server()
    a = Api(s.url)
    name, key = create(a, dim=2)
    a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                  "items": [{"id": str(i), "vector": [i, i], "contents": f"c{i}"} for i in range(300)]})
    a.post("/v1/indexes/train", {"index_name": name, "index_key": key, "n_lists": 4})
    a.post("/v1/vectors/delete", {"index_name": name, "index_key": key, "ids": ["7"]})
    before = a.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": [3, 3], "top_k": 5})[1]
    s.restart()
    a = Api(s.url)
    st, d = a.post("/v1/indexes/describe", {"index_name": name, "index_key": key})
    assert d["is_trained"] and d["n_lists"] == 4 and d["dimension"] == 2
    assert a.post("/v1/vectors/num_vectors", {"index_name": name, "index_key": key})[1]["result"] == 299
    assert a.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": [3, 3], "top_k": 5})[1] == before
    assert a.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["9"], "include": ["contents"]})[1] == {"results": [{"id": "9", "contents": "c9"}]}
    assert_error(*a.post("/v1/indexes/describe", {"index_name": name, "index_key": new_key()}), 401)
    st, b = a.post("/v1/indexes/delete", {"index_name": name, "index_key": key})
    assert st == 200 and b["message"] == f"Index '{name}' deleted successfully"
    s.restart()
    assert name not in Api(s.url).get("/v1/indexes/list")[1]["indexes"]


def test_auto_training_in_background(make_server):
    s = make_server(env={"AUTO_TRAIN_MIN_VECTORS": "500"})
    a = Api(s.url)
    name, key = create(a, dim=2)
    st, b = a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                          "items": [{"id": str(i), "vector": [i % 37, i % 11]} for i in range(400)]})
    assert "training_triggered" not in b
    st, b = a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                          "items": [{"id": f"x{i}", "vector": [i % 13, i % 7]} for i in range(200)]})
    assert b["training_triggered"] is True and "threshold: 500" in b["training_message"]
    import time
    deadline = time.time() + 60
    while time.time() < deadline:
        d = a.post("/v1/indexes/describe", {"index_name": name, "index_key": key})[1]
        if d["is_trained"]:
            break
        # Queries keep working while training runs.
        assert a.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": [1, 1], "top_k": 3})[0] == 200
        time.sleep(0.1)
    assert d["is_trained"] and d["n_lists"] == 32 and d["num_vectors"] == 600  # 2**round(log2(sqrt(600)))


def test_auto_training_can_be_disabled(make_server):
    s = make_server(env={"AUTO_TRAIN_MIN_VECTORS": "10", "AUTO_TRAIN_DISABLED": "true"})
    a = Api(s.url)
    name, key = create(a, dim=2)
    st, b = a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                          "items": [{"id": str(i), "vector": [i, 1]} for i in range(50)]})
    assert st == 200 and "training_triggered" not in b


def test_bad_setting_stops_start_naming_it(tmp_path):
    import subprocess
    from conftest import BIN
    for env, needle in [({"PORT": "eighty"}, "PORT"), ({"CYBORGDB_DB_TYPE": "postgres"}, "CYBORGDB_DB_TYPE"),
                        ({"CYBORGDB_CONFIG_FILE": str(tmp_path / "missing.yaml")}, "missing.yaml"),
                        ({"SEALDB_MAX_BODY_MB": "0"}, "SEALDB_MAX_BODY_MB")]:
        r = subprocess.run([str(BIN)], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        assert needle in r.stderr, r.stderr


def test_help_lists_flags_with_defaults():
    import subprocess
    from conftest import BIN
    r = subprocess.run([str(BIN), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    for flag in ["--host", "--port", "--db-type", "--disk-path", "--log-level", "--auto-train-min-vectors",
                 "--auto-train-disabled", "--config", "[default: 127.0.0.1]", "[default: 8000]", "[env: PORT="]:
        assert flag in r.stdout, flag


def test_memory_backend_and_yaml(make_server, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("service:\n  cyborgdb_db_type: memory\n  auto_train_min_vectors: 123\n")
    s = make_server(env={"CYBORGDB_CONFIG_FILE": str(cfg)}, name="mem")
    a = Api(s.url)
    assert a.get("/v1/indexes/training-status")[1]["retrain_threshold"] == 123
    name, key = create(a)
    s.restart()
    assert name not in Api(s.url).get("/v1/indexes/list")[1]["indexes"]
    assert not (tmp_path / "mem").exists() or not any((tmp_path / "mem").iterdir())


def test_default_top_k_is_100_and_greedy_probes_more(api):
    name, key = create(api, dim=2)
    items = [{"id": str(i), "vector": [float(i % 30), float(i // 30)]} for i in range(600)]
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})
    st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key, "query_vectors": [5, 5]})
    assert st == 200 and len(b["results"]) == 100
    api.post("/v1/indexes/train", {"index_name": name, "index_key": key, "n_lists": 32})

    def ids(**kw):
        body = {"index_name": name, "index_key": key, "query_vectors": [14.5, 10], "top_k": 60, **kw}
        return [r["id"] for r in api.post("/v1/vectors/query", body)[1]["results"]]

    one, two, greedy_one = ids(n_probes=1), ids(n_probes=2), ids(n_probes=1, greedy=True)
    assert greedy_one == two  # greedy doubles the probes
    assert len(one) < len(two) <= 60  # ~19 vectors per list: one list cannot fill top_k


def test_auto_training_retrains_as_the_index_grows(make_server):
    s = make_server(env={"AUTO_TRAIN_MIN_VECTORS": "100"}, name="grow")
    a = Api(s.url)
    name, key = create(a, dim=2)
    import time

    def wait_lists(want):
        deadline = time.time() + 60
        while time.time() < deadline:
            d = a.post("/v1/indexes/describe", {"index_name": name, "index_key": key})[1]
            if d["is_trained"] and d["n_lists"] == want:
                return d
            time.sleep(0.1)
        raise AssertionError(f"n_lists never reached {want}: {d}")

    a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                  "items": [{"id": str(i), "vector": [i % 17, i % 5]} for i in range(100)]})
    wait_lists(8)  # 2**round(log2(sqrt(100)))
    st, b = a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                          "items": [{"id": f"g{i}", "vector": [i % 19, i % 7]} for i in range(300)]})
    assert b.get("training_triggered") is True
    d = wait_lists(16)  # sqrt(400) = 20 -> 16 lists
    assert d["num_vectors"] == 400


def test_logs_never_contain_keys(make_server):
    s = make_server(env={"CYBORGDB_SERVICE_ROOT_KEY": "root-secret-zz9", "CYBORGDB_SERVICE_LOG_LEVEL": "DEBUG"},
                    name="logs")
    a = Api(s.url, "root-secret-zz9")
    name, key = create(a, dim=2)
    a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [{"id": "a", "vector": [1, 2]}]})
    a.post("/v1/indexes/describe", {"index_name": name, "index_key": new_key()})
    tok = a.post(f"/v1/indexes/{name}/users", {"permissions": ["read"], "index_key": key})[1]["api_key"]
    a.get(f"/v1/indexes/{name}/users?index_key={key}")
    Api(s.url, tok).post("/v1/vectors/query", {"index_name": name, "query_vectors": [1, 2]})
    Api(s.url, "wrong-root-key-123").get("/v1/indexes/list")
    s.stop()
    logs = s.logs()
    assert "request" in logs and "/v1/vectors/upsert" in logs
    for secret in [key, "root-secret-zz9", tok, tok[7:20], "wrong-root-key-123"]:
        assert secret not in logs, secret


def test_oversized_bodies_get_413_and_write_nothing(make_server):
    """A body over --max-body-mb is refused with our error body, whether it declares its length
    or arrives chunked; the limit is not hit by a normal batch, and nothing of a refused upsert
    is stored."""
    s = make_server(env={"SEALDB_MAX_BODY_MB": "1"})
    api = Api(s.url)
    name, key = unique(), new_key()
    assert api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 64})[0] == 200

    def items(n, tag):
        return [{"id": f"{tag}{i}", "vector": [0.123456789] * 64} for i in range(n)]

    small = {"index_name": name, "index_key": key, "items": items(100, "ok")}
    assert api.post("/v1/vectors/upsert", small)[0] == 200
    big = json.dumps({"index_name": name, "index_key": key, "items": items(2000, "big")}).encode()
    assert len(big) > 1 << 20
    r = requests.post(s.url + "/v1/vectors/upsert", data=big,
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["status_code"] == 413 and "max-body-mb" in body["detail"]
    assert key not in r.text

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    r = requests.post(s.url + "/v1/vectors/upsert", data=chunks(),
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["status_code"] == 413
    # A chunked body under the limit still works.
    ok = json.dumps({"index_name": name, "index_key": key, "items": items(10, "chunked")}).encode()
    r = requests.post(s.url + "/v1/vectors/upsert", data=iter([ok[:100], ok[100:]]),
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text
    st, n = api.post("/v1/vectors/num_vectors", {"index_name": name, "index_key": key})
    assert st == 200 and n["result"] == 110
    # The spec declares the status on every operation that takes a body.
    spec = requests.get(s.url + "/v1/openapi.json", timeout=10).json()
    checked = 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method not in ("get", "head"):
                assert "413" in op["responses"], (method, path)
                checked += 1
    assert checked >= 10
