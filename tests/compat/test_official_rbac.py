"""RBAC through the official client (0.18.0 and 0.17.0)."""
import cyborgdb
import numpy as np
import pytest

from test_official_client import expect_status

ROOT = "root-key-for-client-tests"


@pytest.fixture
def setup(make_server):
    s = make_server(env={"CYBORGDB_SERVICE_ROOT_KEY": ROOT}, name="client-rbac")
    root = cyborgdb.Client(s.url, api_key=ROOT)
    key = root.generate_key()
    ix = root.create_index("docs", key, dimension=3)
    ix.upsert([{"id": str(i), "vector": [i, 1, 0], "metadata": {"i": i}} for i in range(10)])
    other = root.create_index("other", root.generate_key(), dimension=3)
    return s, root, ix, other


def user_client(s, ix, perms):
    u = ix.create_user(perms)
    assert u["api_key"].startswith("cdbk_")
    return u, cyborgdb.Client(s.url, api_key=u["api_key"])


def test_read_only_user(setup):
    s, root, ix, _ = setup
    u, c = user_client(s, ix, ["read"])
    mine = c.load_index("docs")
    assert [r["id"] for r in mine.query(query_vectors=[0, 1, 0], top_k=2)] == ["0", "1"]
    assert mine.get(["3"])[0]["metadata"] == {"i": 3}
    expect_status(403, mine.upsert, [{"id": "x", "vector": [1, 1, 1]}])
    expect_status(403, mine.delete, ["1"])
    expect_status(403, mine.train)
    expect_status(403, mine.delete_index)
    expect_status(403, c.create_index, "new", c.generate_key(), dimension=3)
    expect_status(403, mine.create_user, ["read"])
    expect_status(403, mine.list_users)


def test_read_write_user(setup):
    s, root, ix, _ = setup
    u, c = user_client(s, ix, ["read", "write"])
    mine = c.load_index("docs")
    mine.upsert([{"id": "new", "vector": [5, 5, 5]}])
    mine.upsert(["bin"], np.array([[6, 6, 6]], dtype=np.float32))
    assert mine.query(query_vectors=[5, 5, 5], top_k=1)[0]["id"] == "new"
    mine.delete(["0"])
    assert sorted(ix.list_ids()) == sorted([str(i) for i in range(1, 10)] + ["new", "bin"])
    expect_status(403, mine.train)
    expect_status(403, mine.delete_index)


def test_listing_revocation_and_other_index(setup):
    s, root, ix, other = setup
    r, rc = user_client(s, ix, ["read"])
    w, _ = user_client(s, ix, ["read", "write"])
    users = {u["user_id"]: sorted(u["permissions"]) for u in ix.list_users()}
    assert users == {r["user_id"]: ["read"], w["user_id"]: ["read", "write"]}
    mine = rc.load_index("docs")
    expect_status(403, rc.load_index, "other")
    ix.delete_user(r["user_id"])
    expect_status(401, mine.query, query_vectors=[1, 1, 1])
    expect_status(401, mine.get, ["1"])
    expect_status(401, rc.load_index, "docs")
    assert [u["user_id"] for u in ix.list_users()] == [w["user_id"]]


def test_bad_keys_and_permissions(setup):
    s, root, ix, _ = setup
    u, _ = user_client(s, ix, ["read"])
    for bad in [u["api_key"][:-3], u["api_key"][:-1] + ("A" if u["api_key"][-1] != "A" else "B")]:
        c = cyborgdb.Client(s.url, api_key=bad)
        expect_status(401, c.load_index, "docs")
    expect_status(400, ix.create_user, ["superuser"])
    expect_status(400, ix.create_user, [])
