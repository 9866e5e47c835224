"""KMS-backed indexes against real KMS servers: OpenBao (Vault transit) and moto (AWS KMS).

Covers create/upsert/query/get, restart, every 400 case, 502 on an outage and recovery
without a restart, rotation + rewrap (proved by raising min_decryption_version), slot moves,
client-key -> KMS migration, start-up drift, RBAC users on KMS indexes, the official client,
and that the raw store never holds an unwrapped KEK.
"""
import base64
import json
import re
import secrets
import time

import pytest
import requests

from conftest import Api, new_key, unique
from kms_servers import Moto, OpenBao, registry_yaml


@pytest.fixture(scope="module")
def bao(tmp_path_factory):
    b = OpenBao(tmp_path_factory.mktemp("bao"))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    m = Moto(tmp_path_factory.mktemp("moto"))
    yield m
    m.stop()


@pytest.fixture
def kms_server(make_server, tmp_path, moto):
    """make(slots, env=..., name=...) -> a SealDB server whose YAML has those slots."""

    def make(slots, env=None, name="data", args=()):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(registry_yaml(slots))
        return make_server(env={**Moto.ENV, **(env or {})}, args=["--config", str(cfg), *args],
                           name=name)

    return make


def upsert_some(api, name, n=20, dim=4, key=None):
    items = [{"id": f"v{i}", "vector": [float(i), 1.0, 0.5, -float(i)][:dim],
              "metadata": {"i": i}, "contents": f"text {i}"} for i in range(n)]
    body = {"index_name": name, "items": items}
    if key:
        body["index_key"] = key
    st, b = api.post("/v1/vectors/upsert", body)
    assert st == 200, b


def check_readable(api, name, n=20, key=None):
    extra = {"index_key": key} if key else {}
    st, b = api.post("/v1/vectors/query", {"index_name": name, "query_vectors": [3.0, 1.0, 0.5, -3.0],
                                           "top_k": 3, "include": ["distance", "metadata"], **extra})
    assert st == 200, b
    assert b["results"][0]["id"] == "v3" and b["results"][0]["metadata"] == {"i": 3}
    st, b = api.post("/v1/vectors/get", {"index_name": name, "ids": ["v7"],
                                         "include": ["contents", "metadata"], **extra})
    assert st == 200, b
    assert b["results"][0]["contents"] == "text 7"
    st, b = api.post("/v1/vectors/num_vectors", {"index_name": name, **extra})
    assert st == 200 and b["result"] == n, b


def create_kms(api, name, slot, dim=4):
    st, b = api.post("/v1/indexes/create", {"index_name": name, "kms_name": slot, "dimension": dim})
    assert st == 200, b
    return b


@pytest.mark.parametrize("provider", ["vault", "aws-kms"])
def test_kms_index_lifecycle_and_restart(provider, bao, moto, kms_server):
    if provider == "vault":
        key = unique("k")
        bao.create_key(key)
        slot = bao.slot(key)
    else:
        slot = moto.slot(moto.create_key(alias=f"alias/{unique('a')}"))
    srv = kms_server({"main": slot})
    api = Api(srv.url)
    name = unique()
    create_kms(api, name, "main")
    st, b = api.post("/v1/indexes/describe", {"index_name": name})
    assert st == 200, b
    assert b["kms_name"] == "main" and b["kms_provider"] == provider
    upsert_some(api, name)
    check_readable(api, name)
    srv.restart()
    check_readable(api, name)
    st, b = api.post("/v1/indexes/train", {"index_name": name, "n_lists": 2})
    assert st == 200, b
    check_readable(api, name)
    st, b = api.post("/v1/indexes/delete", {"index_name": name})
    assert st == 200, b
    st, b = api.get("/v1/indexes/list")
    assert name not in b["indexes"]


def test_vault_approle_login_and_relogin_after_the_token_expires(bao, kms_server):
    key = unique("k")
    bao.create_key(key)
    role_id, secret_id = bao.approle(key, unique("role"), token_ttl="2s")
    slot = bao.slot(key, role_id=role_id, secret_id=secret_id)
    del slot["token"]
    srv = kms_server({"ar": slot}, env={"INDEX_KEK_CACHE_TTL_SECONDS": "0"})
    api = Api(srv.url)
    name = unique()
    create_kms(api, name, "ar")
    upsert_some(api, name)
    time.sleep(2.5)  # the AppRole token has expired: the provider logs in again
    check_readable(api, name)
    assert role_id not in srv.logs() and secret_id not in srv.logs()


def test_aws_assume_role_with_external_id(moto, kms_server):
    slot = moto.slot(moto.create_key(), role_arn="arn:aws:iam::123456789012:role/sealdb-test",
                     external_id="ext-1", role_session_name="sealdb-ci")
    srv = kms_server({"byok": slot})
    api = Api(srv.url)
    name = unique()
    create_kms(api, name, "byok")
    assumed = requests.get(moto.url + "/moto-api/data.json", timeout=10).json()["sts"]["AssumedRole"]
    assert any("sealdb-ci" in json.dumps(r) for r in assumed), assumed
    upsert_some(api, name)
    srv.restart()
    check_readable(api, name)


def test_aws_endpoint_from_the_environment(moto, kms_server):
    """A slot without `endpoint` follows AWS_ENDPOINT_URL, as every AWS SDK does."""
    slot = moto.slot(moto.create_key())
    del slot["endpoint"]
    srv = kms_server({"env-aws": slot}, env={"AWS_ENDPOINT_URL": moto.url})
    api = Api(srv.url)
    name = unique()
    create_kms(api, name, "env-aws")
    upsert_some(api, name)
    check_readable(api, name)


def test_every_400_case(bao, kms_server):
    key = unique("k")
    bao.create_key(key)
    srv = kms_server({"main": bao.slot(key)})
    api = Api(srv.url)
    kms_ix, client_ix, ck = unique(), unique(), new_key()
    create_kms(api, kms_ix, "main")
    assert api.post("/v1/indexes/create", {"index_name": client_ix, "index_key": ck,
                                           "dimension": 4})[0] == 200

    def bad(path, body, want):
        st, b = api.post(path, body)
        assert st == 400, (path, st, b)
        assert want in b["detail"], (path, b)

    bad("/v1/indexes/create", {"index_name": unique(), "kms_name": "main", "index_key": new_key(),
                               "dimension": 4}, "mutually exclusive")
    bad("/v1/indexes/create", {"index_name": unique(), "dimension": 4}, "exactly one")
    bad("/v1/indexes/create", {"index_name": unique(), "kms_name": "nope", "dimension": 4},
        "no KMS slot named 'nope'")
    bad("/v1/indexes/create", {"index_name": unique(), "kms_name": "none", "dimension": 4},
        "no KMS slot named 'none'")
    for path, extra in [("/v1/indexes/describe", {}), ("/v1/vectors/num_vectors", {}),
                        ("/v1/vectors/query", {"query_vectors": [1, 2, 3, 4]}),
                        ("/v1/vectors/upsert", {"items": [{"id": "a", "vector": [1, 2, 3, 4]}]}),
                        ("/v1/vectors/get", {"ids": ["a"]}), ("/v1/indexes/train", {}),
                        ("/v1/indexes/delete", {})]:
        bad(path, {"index_name": kms_ix, "index_key": new_key(), **extra}, "KMS-backed")
    bad("/v1/indexes/rewrap", {"index_name": kms_ix, "kms_name": "nope"}, "no KMS slot named 'nope'")
    bad("/v1/indexes/rewrap", {"index_name": kms_ix, "index_key": new_key()}, "KMS-backed")
    bad("/v1/indexes/rewrap", {"index_name": client_ix, "index_key": ck}, "client-supplied key")
    bad("/v1/indexes/rewrap", {"index_name": client_ix, "index_key": ck, "kms_name": "nope"},
        "no KMS slot named 'nope'")
    # Not 400: an unknown index is 404, a wrong or missing current key 401.
    assert api.post("/v1/indexes/rewrap", {"index_name": unique()})[0] == 404
    assert api.post("/v1/indexes/rewrap", {"index_name": client_ix, "kms_name": "main"})[0] == 401
    assert api.post("/v1/indexes/rewrap", {"index_name": client_ix, "kms_name": "main",
                                           "index_key": new_key()})[0] == 401
    # And nothing of the refused requests changed the indexes.
    check_client = api.post("/v1/indexes/describe", {"index_name": client_ix, "index_key": ck})
    assert check_client[0] == 200 and "kms_name" not in check_client[1]


@pytest.mark.parametrize("slot, want", [
    ({"provider": "vault", "address": "http://127.0.0.1:1", "token": "t"}, "kms.registry.bad: KMS misconfigured: field 'key_name'"),
    ({"provider": "vault", "address": "http://127.0.0.1:1", "key_name": "k", "token": "${SEALDB_NO_SUCH_VAR}"}, "kms.registry.bad.token"),
    ({"provider": "aws-kms", "key_id": "alias/x"}, "kms.registry.bad: KMS misconfigured: field 'region'"),
    ({"provider": "none"}, "provider 'none' is reserved"),
    ({"provider": "gcp-kms", "key_id": "x"}, "unknown provider 'gcp-kms'"),
    ({"key_id": "x"}, "kms.registry.bad: field 'provider' is required"),
])
def test_a_bad_slot_stops_the_start_naming_slot_and_field(slot, want, kms_server):
    with pytest.raises(RuntimeError) as e:
        kms_server({"bad": slot})
    assert want in str(e.value), str(e.value)[-600:]


def test_kms_failure_at_create_is_502_and_leaves_nothing(bao, kms_server):
    key = unique("k")
    bao.create_key(key)
    srv = kms_server({"missing": bao.slot(key, token="not-a-valid-token")})
    api = Api(srv.url)
    name = unique()
    st, b = api.post("/v1/indexes/create", {"index_name": name, "kms_name": "missing", "dimension": 4})
    assert st == 502, b
    assert "KMS slot 'missing' (vault): KMS denied the request" in b["detail"], b
    assert "not-a-valid-token" not in b["detail"]
    assert name not in api.get("/v1/indexes/list")[1]["indexes"]
    # The name is still free.
    assert api.post("/v1/indexes/create", {"index_name": name, "index_key": new_key(),
                                           "dimension": 4})[0] == 200


@pytest.mark.parametrize("provider", ["vault", "aws-kms"])
def test_outage_is_502_naming_the_slot_then_recovers_without_restart(provider, bao, moto, kms_server):
    if provider == "vault":
        key = unique("k")
        bao.create_key(key)
        slot, kms = bao.slot(key), bao
    else:
        slot, kms = moto.slot(moto.create_key()), moto
    srv = kms_server({"flaky": slot}, env={"INDEX_KEK_CACHE_TTL_SECONDS": "1"})
    api = Api(srv.url)
    name = unique()
    create_kms(api, name, "flaky")
    upsert_some(api, name)
    kms.pause()
    try:
        time.sleep(1.2)  # the cached KEK expires
        st, b = api.post("/v1/vectors/num_vectors", {"index_name": name})
        assert st == 502, b
        assert f"KMS slot 'flaky' ({provider})" in b["detail"], b
        st, b = api.post("/v1/vectors/upsert", {"index_name": name, "items": [
            {"id": "lost?", "vector": [0, 0, 0, 0]}]})
        assert st == 502, b
        st, b = api.post("/v1/indexes/rewrap", {"index_name": name})
        assert st == 502, b  # and the old envelope stays
    finally:
        kms.resume()
    check_readable(api, name)  # nothing lost, nothing half-written, no restart
    srv.restart()
    check_readable(api, name)


def test_cached_kek_serves_within_the_ttl_during_an_outage(bao, kms_server):
    key = unique("k")
    bao.create_key(key)
    srv = kms_server({"s": bao.slot(key)}, env={"INDEX_KEK_CACHE_TTL_SECONDS": "300"})
    api = Api(srv.url)
    name = unique()
    create_kms(api, name, "s")
    upsert_some(api, name)
    bao.pause()
    try:
        check_readable(api, name)
    finally:
        bao.resume()


def test_rotation_then_rewrap_onto_the_new_version(bao, kms_server):
    key = unique("k")
    bao.create_key(key)
    srv = kms_server({"rot": bao.slot(key)})
    api = Api(srv.url)
    moved, stayed = unique(), unique()
    for n in (moved, stayed):
        create_kms(api, n, "rot")
        upsert_some(api, n)
    bao.rotate(key)
    assert bao.key(key)["latest_version"] == 2
    srv.restart()  # empty KEK cache: the v1 wraps are unwrapped by the rotated key
    check_readable(api, moved)
    st, b = api.post("/v1/indexes/rewrap", {"index_name": moved})
    assert st == 200, b
    assert "key version 2" in b["message"], b
    bao.set_min_decryption_version(key, 2)
    srv.restart()
    check_readable(api, moved)  # its KEK is now wrapped by v2
    st, b = api.post("/v1/vectors/num_vectors", {"index_name": stayed})
    assert st == 502, b  # still wrapped by v1, which the KMS no longer decrypts
    assert "KMS slot 'rot'" in b["detail"]


def test_slot_to_slot_move_and_client_key_migration(bao, moto, kms_server, tmp_path):
    ka = unique("k")
    bao.create_key(ka)
    aws_key = moto.create_key()
    slots = {"a": bao.slot(ka), "b": moto.slot(aws_key)}
    srv = kms_server(slots)
    api = Api(srv.url)
    kms_ix, client_ix, ck = unique(), unique(), new_key()
    create_kms(api, kms_ix, "a")
    upsert_some(api, kms_ix)
    assert api.post("/v1/indexes/create", {"index_name": client_ix, "index_key": ck,
                                           "dimension": 4})[0] == 200
    upsert_some(api, client_ix, key=ck)

    st, b = api.post("/v1/indexes/rewrap", {"index_name": kms_ix, "kms_name": "b"})
    assert st == 200, b
    st, b = api.post("/v1/indexes/rewrap", {"index_name": client_ix, "kms_name": "b",
                                            "index_key": ck})
    assert st == 200, b
    for n in (kms_ix, client_ix):
        assert api.post("/v1/indexes/describe", {"index_name": n})[1]["kms_name"] == "b"
        check_readable(api, n)
    # The old client key is refused now.
    st, b = api.post("/v1/vectors/num_vectors", {"index_name": client_ix, "index_key": ck})
    assert st == 400 and "KMS-backed" in b["detail"], b
    # Neither index needs slot a any more: a server that only knows slot b reads both.
    srv.stop()
    cfg = tmp_path / "only-b.yaml"
    cfg.write_text(registry_yaml({"b": slots["b"]}))
    srv.args = ["--config", str(cfg)]
    srv.start()
    for n in (kms_ix, client_ix):
        check_readable(api, n)


def test_a_changed_key_in_the_config_is_rewrapped_at_start(bao, kms_server, tmp_path):
    old, new = unique("k"), unique("k")
    bao.create_key(old)
    bao.create_key(new)
    srv = kms_server({"s": bao.slot(old)})
    api = Api(srv.url)
    name = unique()
    create_kms(api, name, "s")
    upsert_some(api, name)
    srv.stop()
    cfg = tmp_path / "moved.yaml"
    cfg.write_text(registry_yaml({"s": bao.slot(new)}))
    srv.args = ["--config", str(cfg)]
    srv.start()
    assert "re-wrapped under the slot's current key" in srv.logs()
    check_readable(api, name)
    # Proof that the old key is no longer needed: make it unable to decrypt, restart.
    bao.rotate(old)
    bao.set_min_decryption_version(old, 2)
    srv.restart()
    check_readable(api, name)


def test_rbac_users_on_a_kms_index_need_no_index_key(bao, kms_server):
    key = unique("k")
    bao.create_key(key)
    root = secrets.token_hex(16)
    srv = kms_server({"s": bao.slot(key)}, env={"CYBORGDB_SERVICE_ROOT_KEY": root})
    admin = Api(srv.url, root)
    name = unique()
    create_kms(admin, name, "s")
    st, b = admin.post(f"/v1/indexes/{name}/users", {"permissions": ["read", "write"]})
    assert st == 200, b
    user = Api(srv.url, b["api_key"])
    upsert_some(user, name)
    check_readable(user, name)
    st, b = admin.get(f"/v1/indexes/{name}/users")
    assert st == 200 and len(b["users"]) == 1, b
    # Rewrap needs the root key when RBAC is on.
    assert user.post("/v1/indexes/rewrap", {"index_name": name})[0] == 403
    assert admin.post("/v1/indexes/rewrap", {"index_name": name})[0] == 200
    check_readable(user, name)  # grants wrap the DEK, which a rewrap does not change


def test_official_client_on_a_kms_index(bao, kms_server):
    import cyborgdb

    key = unique("k")
    bao.create_key(key)
    srv = kms_server({"s": bao.slot(key)})
    client = cyborgdb.Client(srv.url, api_key=None)
    name = unique()
    index = client.create_index(index_name=name, kms_name="s", dimension=4)
    index.upsert([{"id": f"v{i}", "vector": [float(i), 1.0, 0.5, -float(i)],
                   "metadata": {"i": i}} for i in range(10)])
    res = index.query(query_vectors=[3.0, 1.0, 0.5, -3.0], top_k=2)
    assert res[0]["id"] == "v3", res
    again = client.load_index(index_name=name)  # no index_key: the server resolves it
    assert again.get(ids=["v4"], include=["metadata"])[0]["metadata"] == {"i": 4}


def test_the_raw_store_never_holds_the_unwrapped_kek(bao, kms_server):
    key = unique("k")
    bao.create_key(key)
    srv = kms_server({"s": bao.slot(key)})
    api = Api(srv.url)
    name = unique()
    create_kms(api, name, "s")
    upsert_some(api, name)
    srv.stop()
    raw = b"".join(p.read_bytes() for p in srv.data_dir.rglob("*") if p.is_file())
    # Recover the KEK the way only someone holding the KMS could: the envelope's Vault
    # ciphertext, bound to the index id that follows the meta record's magic.
    # The envelope's fields are length-prefixed (u32 LE, docs/FORMAT.md).
    ciphertexts = set()
    for m in re.finditer(rb"vault:v\d+:", raw):
        n = int.from_bytes(raw[m.start() - 4:m.start()], "little")
        ciphertexts.add(raw[m.start():m.start() + n])
    assert len(ciphertexts) == 1, ciphertexts
    meta = raw.index(b"SDBM\x02")
    index_id = raw[meta + 5: meta + 21]
    # The decrypt authenticates the index id as associated data, so this is the KEK the
    # server wrapped for this very index.
    kek = bao.decrypt(key, ciphertexts.pop().decode(), b"sealdb/v1/kek/" + index_id)
    assert len(kek) == 32
    for form in (kek, kek.hex().encode(), kek.hex().upper().encode(), base64.b64encode(kek)):
        assert form not in raw
