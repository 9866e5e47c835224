"""Server-side embedding over plain HTTP: the published sentence-transformers similarities, the
model list, the 400/422 cases, and a server without the model installed (503 naming the
command that installs it). tests/run.sh installs all-MiniLM-L6-v2 into SEALDB_MODELS_DIR."""
import numpy as np
import pytest

from conftest import Api, new_key, unique

MODEL = "all-MiniLM-L6-v2"


def create(api, model=MODEL, **extra):
    name, key = unique("emb"), new_key()
    st, b = api.post("/v1/indexes/create", {"index_name": name, "index_key": key,
                                            "embedding_model": model, **extra})
    return st, b, name, key


def test_the_published_similarities(api):
    st, b, name, key = create(api)
    assert st == 200, b
    st, d = api.post("/v1/indexes/describe", {"index_name": name, "index_key": key})
    assert d["dimension"] == 384 and d["embedding_model"] == MODEL, d
    texts = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    st, b = api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [
        {"id": str(i), "contents": t} for i, t in enumerate(texts)]})
    assert st == 200, b
    st, got = api.post("/v1/vectors/get", {"index_name": name, "index_key": key,
                                           "ids": ["0", "1", "2"], "include": ["vector"]})
    assert st == 200, got
    v = {g["id"]: np.array(g["vector"]) for g in got["results"]}
    for i in v:
        assert abs(np.linalg.norm(v[i]) - 1) < 1e-4, "normalised"
    cos = lambda a, b: float(v[a] @ v[b])
    assert abs(cos("0", "1") - 0.6660) < 0.001, cos("0", "1")
    assert abs(cos("0", "2") - 0.1046) < 0.001, cos("0", "2")
    assert abs(cos("1", "2") - 0.1411) < 0.001, cos("1", "2")
    # A query by text lands on the text itself first.
    st, q = api.post("/v1/vectors/query", {"index_name": name, "index_key": key,
                                           "query_contents": texts[2], "top_k": 1,
                                           "include": ["distance"]})
    assert st == 200 and q["results"][0]["id"] == "2" and q["results"][0]["distance"] < 1e-3, q
    # Several texts at once: one result list per text.
    st, q = api.post("/v1/vectors/query", {"index_name": name, "index_key": key,
                                           "query_contents": [texts[0], texts[2]], "top_k": 1})
    assert st == 200 and [r[0]["id"] for r in q["results"]] == ["0", "2"], q


def test_long_texts_are_truncated_not_refused(api):
    st, b, name, key = create(api)
    long = "word " * 5000
    st, b = api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [
        {"id": "long", "contents": long}]})
    assert st == 200, b


def test_model_list(api):
    st, b = api.get("/v1/embedding-models")
    assert st == 200, b
    m = {x["name"]: x for x in b["models"]}
    mini = m["sentence-transformers/all-MiniLM-L6-v2"]
    assert mini == {"name": "sentence-transformers/all-MiniLM-L6-v2", "dimension": 384,
                    "max_seq_length": 256, "installed": True}
    assert m["BAAI/bge-base-en-v1.5"]["dimension"] == 768


def test_the_400_and_422_cases(api):
    st, b, *_ = create(api, model="no-such-model")
    assert st == 400 and "unknown embedding model 'no-such-model'" in b["detail"], b
    assert MODEL in b["detail"]
    st, b, *_ = create(api, dimension=512)
    assert st == 400 and "384" in b["detail"] and "512" in b["detail"], b
    st, b, name, key = create(api)
    st, b = api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [
        {"id": "a", "contents": "fine"}, {"id": "b"}]})
    assert st == 422 and "items[1] (id 'b') has neither a vector nor contents" in b["detail"], b
    st, n = api.post("/v1/vectors/num_vectors", {"index_name": name, "index_key": key})
    assert n["result"] == 0, "nothing written"
    plain, pk = unique(), new_key()
    api.post("/v1/indexes/create", {"index_name": plain, "index_key": pk, "dimension": 3})
    st, b = api.post("/v1/vectors/upsert", {"index_name": plain, "index_key": pk, "items": [
        {"id": "a", "contents": "text only"}]})
    assert st == 422 and "has no embedding_model" in b["detail"], b
    st, b = api.post("/v1/vectors/query", {"index_name": plain, "index_key": pk,
                                           "query_contents": "hello"})
    assert st == 422 and "has no embedding_model" in b["detail"], b


def test_without_the_model_installed(make_server, tmp_path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    srv = make_server(env={"SEALDB_MODELS_DIR": str(empty)})
    api = Api(srv.url)
    st, b, name, key = create(api)
    assert st == 200, b  # the dimension comes from the model table
    st, b = api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [
        {"id": "a", "contents": "hello"}]})
    assert st == 503, b
    assert "not installed" in b["detail"] and "scripts/fetch-model.sh" in b["detail"], b
    st, b = api.post("/v1/vectors/query", {"index_name": name, "index_key": key,
                                           "query_contents": "hello"})
    assert st == 503, b
    # Vectors still work on that index.
    st, b = api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [
        {"id": "v", "vector": [0.1] * 384}]})
    assert st == 200, b
    models = {m["name"]: m for m in api.get("/v1/embedding-models")[1]["models"]}
    assert models["sentence-transformers/all-MiniLM-L6-v2"]["installed"] is False
    assert srv.proc.poll() is None
