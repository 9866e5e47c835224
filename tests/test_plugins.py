"""Dynamic plugins in a real server process: the example KMS plugin and the example store
plugin (built by `cargo build --workspace`), driven with the official client; every start-up
failure (missing file, not a plugin, wrong ABI version, wrong magic, sha256 mismatch, bad slot)
and every run-time failure (a plugin that panics, one that hangs) fails cleanly while the server
stays up."""
import hashlib
import os
import time
from pathlib import Path

import cyborgdb
import pytest
import requests

from conftest import ROOT, Api, new_key, unique

PLUGIN_DIR = Path(os.environ.get("SEALDB_PLUGIN_DIR", ROOT / "target" / "debug"))


def lib(name):
    p = PLUGIN_DIR / f"lib{name}.so"
    assert p.is_file(), f"{p} is not built (cargo build --workspace builds it)"
    return p


KMS_PLUGIN = "sealdb_example_kms_plugin"
STORE_PLUGIN = "sealdb_example_store_plugin"
FAULTY = "sealdb_test_faulty_plugin"
MAGIC = int.from_bytes(b"SEALDBPL", "little").to_bytes(8, "little")


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def yaml(plugins=(), slots=None):
    lines = []
    if plugins:
        lines.append("plugins:")
        for p in plugins:
            lines.append(f"  - path: {p['path']}")
            for k in ("sha256",):
                if k in p:
                    lines.append(f"    {k}: {p[k]}")
            if "config" in p:
                lines.append("    config:")
                for k, v in p["config"].items():
                    lines.append(f"      {k}: {v}")
    if slots:
        lines += ["kms:", "  registry:"]
        for name, fields in slots.items():
            lines.append(f"    {name}:")
            lines += [f"      {k}: {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def plugin_server(make_server, tmp_path):
    def make(text, env=None, args=(), name="data"):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(text)
        return make_server(env=env, args=["--config", str(cfg), *args], name=name)
    return make


def roundtrip(client, name, **create):
    index = client.create_index(index_name=name, dimension=4, **create)
    index.upsert([{"id": f"v{i}", "vector": [float(i), 1.0, 0.5, -float(i)],
                   "metadata": {"i": i}, "contents": f"text {i}"} for i in range(30)])
    res = index.query(query_vectors=[5.0, 1.0, 0.5, -5.0], top_k=3)
    assert res[0]["id"] == "v5", res
    return index


def reread(client, name, key=None):
    index = client.load_index(index_name=name, index_key=key)
    got = index.get(ids=["v7"], include=["metadata", "contents"])
    assert got[0]["metadata"] == {"i": 7}, got
    res = index.query(query_vectors=[9.0, 1.0, 0.5, -9.0], top_k=1)
    assert res[0]["id"] == "v9", res


def test_example_kms_plugin_serves_an_index_through_restart(plugin_server, tmp_path):
    key_file = tmp_path / "master.key"
    key_file.write_text(os.urandom(32).hex())
    path = lib(KMS_PLUGIN)
    srv = plugin_server(yaml([{"path": path, "sha256": sha256(path)}],
                             {"files": {"provider": "example-file-kms", "key_file": key_file}}),
                        env={"INDEX_KEK_CACHE_TTL_SECONDS": "0"})
    assert "plugin loaded" in srv.logs() and "example-file-kms slot ready" in srv.logs()
    client = cyborgdb.Client(srv.url)
    name = unique()
    roundtrip(client, name, kms_name="files")
    st, b = Api(srv.url).post("/v1/indexes/describe", {"index_name": name})
    assert b["kms_provider"] == "example-file-kms", b
    srv.restart()
    reread(client, name)
    # The plugin reads its key file on every call: gone -> 502 naming the slot, back -> served.
    saved = key_file.read_text()
    key_file.unlink()
    st, b = Api(srv.url).post("/v1/vectors/num_vectors", {"index_name": name})
    assert st == 502 and "KMS slot 'files' (example-file-kms)" in b["detail"], b
    key_file.write_text(saved)
    reread(client, name)


def test_example_store_plugin_is_selected_by_db_type(plugin_server):
    srv = plugin_server(yaml([{"path": lib(STORE_PLUGIN)}]), args=["--db-type", "example-fs"])
    client = cyborgdb.Client(srv.url)
    name, key = unique(), client.generate_key()
    roundtrip(client, name, index_key=key)
    srv.restart()
    reread(client, name, key)
    records = srv.data_dir / "records-plugin" / "records"
    assert records.is_dir() and any(records.iterdir()), "records are files under the data dir"


def test_builtin_filesystem_store(make_server):
    srv = make_server(env={"CYBORGDB_DB_TYPE": "filesystem"})
    client = cyborgdb.Client(srv.url)
    name, key = unique(), client.generate_key()
    roundtrip(client, name, index_key=key)
    srv.restart()
    reread(client, name, key)
    assert (srv.data_dir / "records").is_dir()


def patched(src, dst, old, new):
    data = Path(src).read_bytes()
    assert old in data
    Path(dst).write_bytes(data.replace(old, new))
    return dst


def start_fails(plugin_server, text, *want):
    with pytest.raises(RuntimeError) as e:
        plugin_server(text)
    msg = str(e.value)
    assert "exited with 1" in msg, msg[-800:]
    for w in want:
        assert w in msg, msg[-800:]


def test_start_up_failures_name_the_file_and_the_reason(plugin_server, tmp_path):
    good = lib(FAULTY)
    head = MAGIC + (1).to_bytes(2, "little") + (0).to_bytes(2, "little")
    wrong_abi = patched(good, tmp_path / "libwrong-abi.so", head,
                        MAGIC + (9).to_bytes(2, "little") + (0).to_bytes(2, "little"))
    wrong_magic = patched(good, tmp_path / "libwrong-magic.so", head, b"NOTSEALD" + head[8:])
    text = tmp_path / "libtext.so"
    text.write_text("hello")
    libc = next(w for w in Path("/proc/self/maps").read_text().split()
                if w.startswith("/") and "libc.so" in w)
    missing = tmp_path / "libmissing.so"
    cases = [
        ({"path": missing}, [str(missing), "no such file"]),
        ({"path": text}, [str(text), "not a loadable library"]),
        ({"path": libc}, [libc, "not a SealDB plugin: it does not export sealdb_plugin_entry_v1"]),
        ({"path": wrong_abi}, [str(wrong_abi), "ABI version 9.0 is not supported"]),
        ({"path": wrong_magic}, [str(wrong_magic), "wrong magic"]),
        ({"path": good, "sha256": "ab" * 32}, [str(good), "sha256 mismatch", sha256(good)]),
    ]
    for entry, want in cases:
        start_fails(plugin_server, yaml([entry]), *want)
    # A slot of a plugin provider with a bad field stops the start too, naming slot and field.
    start_fails(plugin_server, yaml([{"path": good}], {"broken": {"provider": "faulty-kms",
                                                                  "mode": "sideways"}}),
                "kms.registry.broken", "field 'mode'")
    # Two plugins offering the same provider name.
    start_fails(plugin_server, yaml([{"path": good}, {"path": good}]), "already taken")


def test_a_panicking_or_hanging_plugin_fails_the_request_not_the_server(plugin_server, tmp_path):
    good = lib(FAULTY)
    flag = tmp_path / "panic-now"
    srv = plugin_server(
        yaml([{"path": good}], {
            "panics": {"provider": "faulty-kms", "mode": "panic"},
            "hangs": {"provider": "faulty-kms", "mode": "hang"},
            "switch": {"provider": "faulty-kms", "mode": "flag", "flag": flag}}),
        # No backtrace: symbolising one on a loaded machine can outlast the 2 s timeout, and
        # the panic would then be reported as a hang.
        env={"SEALDB_PLUGIN_TIMEOUT_SECONDS": "2", "INDEX_KEK_CACHE_TTL_SECONDS": "0",
             "RUST_BACKTRACE": "0"})
    api = Api(srv.url)
    healthy = unique()
    key = new_key()
    assert api.post("/v1/indexes/create", {"index_name": healthy, "index_key": key,
                                           "dimension": 2})[0] == 200

    st, b = api.post("/v1/indexes/create", {"index_name": unique(), "kms_name": "panics",
                                            "dimension": 2})
    assert st == 502 and "plugin 'sealdb-test-faulty-plugin'" in b["detail"], b
    assert "plugin panicked: faulty-kms was told to panic" in b["detail"], b

    started = time.time()
    st, b = api.post("/v1/indexes/create", {"index_name": unique(), "kms_name": "hangs",
                                            "dimension": 2})
    assert st == 502 and "did not answer within 2 s" in b["detail"], b
    assert time.time() - started < 15

    # An index on the switchable slot works, fails while the plugin panics, works again.
    sw = unique()
    assert api.post("/v1/indexes/create", {"index_name": sw, "kms_name": "switch",
                                           "dimension": 2})[0] == 200
    assert api.post("/v1/vectors/upsert", {"index_name": sw, "items": [
        {"id": "a", "vector": [1, 2]}]})[0] == 200
    flag.write_text("1")
    st, b = api.post("/v1/vectors/num_vectors", {"index_name": sw})
    assert st == 502 and "plugin panicked" in b["detail"], b
    flag.unlink()
    st, b = api.post("/v1/vectors/num_vectors", {"index_name": sw})
    assert st == 200 and b["result"] == 1, b

    # Through all of it the server stayed up and kept serving other indexes.
    assert requests.get(srv.url + "/v1/health", timeout=5).ok
    assert api.post("/v1/vectors/upsert", {"index_name": healthy, "index_key": key, "items": [
        {"id": "x", "vector": [0.5, 0.5]}]})[0] == 200
    assert srv.proc.poll() is None
    # And a call still hung inside the plugin does not keep it from stopping on SIGTERM.
    started = time.time()
    srv.proc.terminate()
    assert srv.proc.wait(timeout=12) == 0
    assert time.time() - started < 12


def test_a_failing_store_plugin_is_500_naming_it_and_the_server_stays_up(plugin_server, tmp_path):
    flag = tmp_path / "store-flag"
    srv = plugin_server(yaml([{"path": lib(FAULTY), "config": {"flag": flag}}]),
                        args=["--db-type", "faulty-store"],
                        env={"SEALDB_PLUGIN_TIMEOUT_SECONDS": "2", "RUST_BACKTRACE": "0"})
    api = Api(srv.url)
    name, key = unique(), new_key()
    assert api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2})[0] == 200
    up = lambda i: api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [
        {"id": f"x{i}", "vector": [1, i]}]})
    assert up(0)[0] == 200
    for mode, want in [("error", "faulty-store was told to fail"),
                       ("panic", "plugin panicked: faulty-store was told to panic"),
                       ("hang", "did not answer within 2 s")]:
        flag.write_text(mode)
        st, b = up(1)
        assert st == 500, (mode, b)
        assert "store plugin 'sealdb-test-faulty-plugin'" in b["detail"] and want in b["detail"], (mode, b)
        flag.unlink()
        assert requests.get(srv.url + "/v1/health", timeout=5).ok
    assert up(2)[0] == 200
    st, b = api.post("/v1/vectors/num_vectors", {"index_name": name, "index_key": key})
    assert st == 200 and b["result"] == 2, b  # the failed upserts wrote nothing
