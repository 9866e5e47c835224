"""Server-side embedding through the official client (0.18.0 and 0.17.0): an index created
with an embedding model and no dimension, text-only upserts, text queries, mixed items."""
import cyborgdb
import pytest

from conftest import unique
from test_official_client import expect_status

MODEL = "all-MiniLM-L6-v2"
DOCS = {
    "weather": "The weather is lovely today, sunny and warm.",
    "stadium": "He drove to the stadium to watch the football match.",
    "cooking": "Slice the onions and fry them in butter until golden.",
    "code": "The compiler rejected the program because of a type error.",
}


@pytest.fixture(scope="module")
def client(server):
    return cyborgdb.Client(server.url)


def test_texts_in_texts_out(client):
    key = client.generate_key()
    ix = client.create_index(unique("emb"), key, embedding_model=MODEL)
    assert client.load_index(ix.index_name, key).dimension == 384
    ix.upsert([{"id": k, "contents": v, "metadata": {"topic": k}} for k, v in DOCS.items()])
    for query, want in [("Is it going to rain? The sky is clear.", "weather"),
                        ("Which team won the game last night?", "stadium"),
                        ("a recipe for dinner", "cooking"),
                        ("why does my build fail with a type mismatch", "code")]:
        res = ix.query(query_contents=query, top_k=2, include=["distance", "metadata"])
        assert res[0]["id"] == want, (query, res)
    # Mixed: an item with its own vector keeps it; one without is embedded.
    own = [0.0] * 384
    own[0] = 1.0
    ix.upsert([{"id": "own", "vector": own, "contents": "ignored for embedding"},
               {"id": "more", "contents": "It is sunny and warm outside."}])
    got = {g["id"]: g for g in ix.get(["own", "more"], include=["vector", "contents"])}
    assert [round(x, 6) for x in got["own"]["vector"][:2]] == [1.0, 0.0]
    assert got["more"]["contents"] == "It is sunny and warm outside."
    res = ix.query(query_contents="lovely sunny weather", top_k=2)
    assert {r["id"] for r in res} == {"weather", "more"}, res


def test_an_unknown_model_or_a_wrong_dimension_is_refused(client):
    key = client.generate_key()
    e = expect_status(400, client.create_index, unique("emb"), key, embedding_model="no-such-model")
    assert MODEL in str(e)
    expect_status(400, client.create_index, unique("emb"), key, embedding_model=MODEL, dimension=8)


def test_without_the_model_the_client_gets_503_naming_the_fix(make_server, tmp_path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    srv = make_server(env={"SEALDB_MODELS_DIR": str(empty)})
    c = cyborgdb.Client(srv.url)
    key = c.generate_key()
    ix = c.create_index(unique("emb"), key, embedding_model=MODEL)
    e = expect_status(503, ix.upsert, [{"id": "a", "contents": "hello"}])
    assert "scripts/fetch-model.sh" in str(e), repr(e)
    expect_status(503, ix.query, query_contents="hello")
