"""Auth modes and per-index users over raw HTTP."""
import base64

import pytest

from conftest import Api, new_key, unique

ROOT = "root-key-for-tests-0123456789"


@pytest.fixture
def rbac(make_server):
    s = make_server(env={"CYBORGDB_SERVICE_ROOT_KEY": ROOT}, name="rbac")
    return s, Api(s.url, ROOT)


def mk_index(root, dim=2, n=5):
    name, key = unique(), new_key()
    assert root.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": dim})[0] == 200
    root.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                     "items": [{"id": str(i), "vector": [i, 1], "contents": f"c{i}"} for i in range(n)]})
    return name, key


def mint(root, name, key, perms):
    st, b = root.post(f"/v1/indexes/{name}/users", {"permissions": perms, "index_key": key})
    assert st == 200, b
    assert b["api_key"].startswith("cdbk_") and len(b["user_id"]) == 32
    return b


def test_root_key_required_everywhere_but_health(rbac):
    s, root = rbac
    anon, wrong = Api(s.url), Api(s.url, "not-the-key")
    assert anon.get("/v1/health")[0] == 200
    for a, detail in [(anon, "API Key is required"), (wrong, "Invalid API Key")]:
        for path in ["/v1/indexes/list", "/v1/indexes/training-status"]:
            st, b = a.get(path)
            assert st == 401 and b["status_code"] == 401 and detail in b["detail"]
        st, b = a.post("/v1/indexes/create", {"index_name": unique(), "index_key": new_key()})
        assert st == 401
        st, b = a.post("/v1/vectors/query", {"index_name": "x", "query_vectors": [1]})
        assert st == 401
    assert root.get("/v1/indexes/list")[0] == 200


def test_read_and_write_users(rbac):
    s, root = rbac
    name, key = mk_index(root)
    reader = Api(s.url, mint(root, name, key, ["read"])["api_key"])
    writer = Api(s.url, mint(root, name, key, ["read", "write"])["api_key"])
    # Readers read without any index key.
    st, b = reader.post("/v1/vectors/query", {"index_name": name, "query_vectors": [0, 1], "top_k": 2})
    assert st == 200 and [r["id"] for r in b["results"]] == ["0", "1"]
    assert reader.post("/v1/indexes/describe", {"index_name": name})[1]["dimension"] == 2
    assert reader.post("/v1/vectors/get", {"index_name": name, "ids": ["3"]})[1]["results"][0]["contents"] == "c3"
    assert reader.post("/v1/vectors/list_ids", {"index_name": name})[1]["count"] == 5
    assert reader.post("/v1/vectors/num_vectors", {"index_name": name})[1]["result"] == 5
    st, b = reader.post("/v1/vectors/upsert", {"index_name": name, "items": [{"id": "r", "vector": [1, 1]}]})
    assert st == 403 and "write" in b["detail"]
    st, b = reader.post("/v1/vectors/delete", {"index_name": name, "ids": ["1"]})
    assert st == 403
    # Writers write.
    assert writer.post("/v1/vectors/upsert", {"index_name": name, "items": [{"id": "w", "vector": [9, 9]}]})[0] == 200
    assert writer.post("/v1/vectors/delete", {"index_name": name, "ids": ["0"]})[0] == 200
    assert root.post("/v1/vectors/num_vectors", {"index_name": name, "index_key": key})[1]["result"] == 5
    # Neither may manage the index or users.
    for u in (reader, writer):
        assert u.post("/v1/indexes/create", {"index_name": unique(), "index_key": new_key()})[0] == 403
        assert u.post("/v1/indexes/train", {"index_name": name})[0] == 403
        assert u.post("/v1/indexes/delete", {"index_name": name})[0] == 403
        assert u.post(f"/v1/indexes/{name}/users", {"permissions": ["read"]})[0] == 403
        assert u.get(f"/v1/indexes/{name}/users")[0] == 403
        # A user sees only its own index.
        assert u.get("/v1/indexes/list")[1]["indexes"] == [name]


def test_forged_truncated_revoked_and_foreign_keys(rbac):
    s, root = rbac
    a_name, a_key = mk_index(root)
    b_name, b_key = mk_index(root)
    user = mint(root, a_name, a_key, ["read"])
    tok = user["api_key"]
    raw = bytearray(base64.urlsafe_b64decode(tok[len("cdbk_1_"):] + "=="))
    raw[40] ^= 1
    forged = "cdbk_1_" + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    for bad in [tok[:-4], forged, "cdbk_", "cdbk_1_" + "A" * 96]:
        st, b = Api(s.url, bad).post("/v1/vectors/query", {"index_name": a_name, "query_vectors": [1, 1]})
        assert st == 401 and b["detail"].startswith("Invalid user API key"), (bad, b)
    u = Api(s.url, tok)
    st, b = u.post("/v1/vectors/query", {"index_name": b_name, "query_vectors": [1, 1]})
    assert st == 403 and b_name in b["detail"]
    assert u.post("/v1/indexes/describe", {"index_name": a_name})[0] == 200
    # Revoke: 204, then refused at once on every route.
    r = __import__("requests").delete(f"{s.url}/v1/indexes/{a_name}/users/{user['user_id']}",
                                      headers={"X-API-Key": ROOT, "X-Index-Key": a_key})
    assert r.status_code == 204 and r.content == b""
    for path, body in [("/v1/vectors/query", {"query_vectors": [1, 1]}), ("/v1/vectors/get", {"ids": ["1"]}),
                       ("/v1/indexes/describe", {})]:
        st, b = u.post(path, {"index_name": a_name, **body})
        assert st == 401, (path, b)


def test_list_and_revoke_users_with_header_or_query_key(rbac):
    s, root = rbac
    name, key = mk_index(root)
    r1 = mint(root, name, key, ["read"])
    r2 = mint(root, name, key, ["write", "read", "write"])
    import requests
    h = {"X-API-Key": ROOT}
    r = requests.get(f"{s.url}/v1/indexes/{name}/users", headers={**h, "X-Index-Key": key})
    assert r.status_code == 200
    got = {u["user_id"]: u["permissions"] for u in r.json()["users"]}
    assert got == {r1["user_id"]: ["read"], r2["user_id"]: ["read", "write"]}
    r = requests.get(f"{s.url}/v1/indexes/{name}/users", params={"index_key": key}, headers=h)
    assert r.status_code == 200 and len(r.json()["users"]) == 2
    r = requests.get(f"{s.url}/v1/indexes/{name}/users", headers={**h, "X-Index-Key": new_key()})
    assert r.status_code == 401
    r = requests.get(f"{s.url}/v1/indexes/{name}/users", headers=h)
    assert r.status_code == 401
    r = requests.get(f"{s.url}/v1/indexes/nope-{name}/users", headers={**h, "X-Index-Key": key})
    assert r.status_code == 404
    r = requests.delete(f"{s.url}/v1/indexes/{name}/users/zz", params={"index_key": key}, headers=h)
    assert r.status_code == 400 and r.json()["status_code"] == 400
    r = requests.delete(f"{s.url}/v1/indexes/{name}/users/{'0' * 32}", params={"index_key": key}, headers=h)
    assert r.status_code == 404
    r = requests.delete(f"{s.url}/v1/indexes/{name}/users/{r1['user_id']}", params={"index_key": key}, headers=h)
    assert r.status_code == 204
    r = requests.get(f"{s.url}/v1/indexes/{name}/users", headers={**h, "X-Index-Key": key})
    assert [u["user_id"] for u in r.json()["users"]] == [r2["user_id"]]


@pytest.mark.parametrize("perms", [[], ["admin"], ["read", "delete"], "read"])
def test_invalid_permissions_are_400(rbac, perms):
    s, root = rbac
    name, key = mk_index(root)
    st, b = root.post(f"/v1/indexes/{name}/users", {"permissions": perms, "index_key": key})
    assert st in (400, 422) if isinstance(perms, str) else st == 400, b
    assert b["status_code"] == st


def test_users_survive_restart_and_die_with_their_index(rbac):
    s, root = rbac
    name, key = mk_index(root)
    tok = mint(root, name, key, ["read"])["api_key"]
    s.restart()
    u = Api(s.url, tok)
    assert u.post("/v1/vectors/num_vectors", {"index_name": name})[1]["result"] == 5
    root = Api(s.url, ROOT)
    assert root.post("/v1/indexes/delete", {"index_name": name, "index_key": key})[0] == 200
    root.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2})
    st, b = u.post("/v1/vectors/num_vectors", {"index_name": name})
    assert st == 403  # bound to the deleted index's id, not its name


def test_user_routes_forbidden_without_rbac(api):
    name, key = unique(), new_key()
    api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2})
    st, b = api.post(f"/v1/indexes/{name}/users", {"permissions": ["read"], "index_key": key})
    assert st == 403 and "CYBORGDB_SERVICE_ROOT_KEY" in b["detail"]
    assert api.get(f"/v1/indexes/{name}/users", headers={"X-Index-Key": key})[0] == 403


def test_legacy_single_key_mode(make_server):
    s = make_server(env={"CYBORGDB_API_KEY": "legacy-key"}, name="legacy")
    legacy, anon = Api(s.url, "legacy-key"), Api(s.url)
    assert anon.get("/v1/health")[0] == 200
    assert anon.get("/v1/indexes/list")[0] == 401
    name, key = unique(), new_key()
    assert legacy.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2})[0] == 200
    assert legacy.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                              "items": [{"id": "a", "vector": [1, 2]}]})[0] == 200
    assert legacy.post("/v1/indexes/train", {"index_name": name, "index_key": key})[0] == 200
    st, b = legacy.post(f"/v1/indexes/{name}/users", {"permissions": ["read"], "index_key": key})
    assert st == 403


def test_legacy_key_next_to_root_key(make_server):
    s = make_server(env={"CYBORGDB_API_KEY": "legacy-key", "CYBORGDB_SERVICE_ROOT_KEY": ROOT}, name="both")
    legacy = Api(s.url, "legacy-key")
    name, key = unique(), new_key()
    assert legacy.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2})[0] == 200
    assert legacy.post(f"/v1/indexes/{name}/users", {"permissions": ["read"], "index_key": key})[0] == 403
    assert legacy.get(f"/v1/indexes/{name}/users", headers={"X-Index-Key": key})[0] == 403
    assert Api(s.url, ROOT).post(f"/v1/indexes/{name}/users", {"permissions": ["read"], "index_key": key})[0] == 200


def test_store_holds_no_user_key_or_root_key(rbac, tmp_path):
    s, root = rbac
    name, key = mk_index(root)
    toks = [mint(root, name, key, p)["api_key"] for p in (["read"], ["read", "write"])]
    s.stop()
    blob = b"".join(p.read_bytes() for p in (tmp_path / "rbac").rglob("*") if p.is_file())
    for t in toks:
        raw = base64.urlsafe_b64decode(t[len("cdbk_1_"):] + "==")
        secret = raw[32:64]
        for needle in [t.encode(), secret, raw]:
            assert needle not in blob
    assert ROOT.encode() not in blob and bytes.fromhex(key) not in blob
