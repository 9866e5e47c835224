"""Operating SealDB, against real server processes: TLS (a throwaway CA made here, the official
client over HTTPS, refusals naming the file, SIGHUP reload), Prometheus metrics (parsed with
prometheus-client after a known workload), request ids and JSON logs, readiness, training
progress, and no secret in DEBUG logs."""
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import threading
import time

import cyborgdb
import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import Api, new_key, unique


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=sealdb-test-ca", cwd=d)
    return d / "ca.pem"


def make_cert(d, name, cn="localhost"):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def served_cert(port):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            return t.getpeercert(binary_form=True)


def test_https_with_the_official_client_and_sighup_reload(make_server, tmp_path, monkeypatch):
    ca = make_ca(tmp_path)
    cert, key = make_cert(tmp_path, "srv")
    srv = make_server(env={"SSL_CERT_PATH": str(cert), "SSL_KEY_PATH": str(key)},
                      scheme="https", verify=str(ca))
    # Verified against our CA, by the official client (urllib3 reads SSL_CERT_FILE).
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    client = cyborgdb.Client(srv.url, verify_ssl=True)
    name, k = unique(), client.generate_key()
    ix = client.create_index(name, k, dimension=3)
    ix.upsert([{"id": "a", "vector": [1, 0, 0]}, {"id": "b", "vector": [0, 1, 0]}])
    assert ix.query(query_vectors=[1, 0, 0], top_k=1)[0]["id"] == "a"
    # Plain HTTP on the TLS port gets no HTTP answer.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(3)
        try:
            data = s.recv(4096)
        except (socket.timeout, ConnectionResetError):
            data = b""
    assert not data.startswith(b"HTTP"), data[:40]
    # SIGHUP: the new certificate is served to new connections, without a restart.
    before = served_cert(srv.port)
    new_cert, new_key_ = make_cert(tmp_path, "srv2", cn="localhost")
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key_.read_bytes())
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 10
    while served_cert(srv.port) == before and time.time() < deadline:
        time.sleep(0.2)
    assert served_cert(srv.port) != before, "certificate not reloaded"
    assert srv.proc.poll() is None
    assert requests.get(srv.url + "/v1/health", verify=str(ca), timeout=5).ok
    assert "TLS certificate reloaded" in srv.logs()


def test_tls_refusals_name_the_file(make_server, tmp_path):
    make_ca(tmp_path)
    cert, key = make_cert(tmp_path, "a")
    _, other_key = make_cert(tmp_path, "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not pem")
    for env, want in [
        ({"SSL_CERT_PATH": str(tmp_path / "nope.pem"), "SSL_KEY_PATH": str(key)}, ["nope.pem", "cannot read"]),
        ({"SSL_CERT_PATH": str(cert), "SSL_KEY_PATH": str(other_key)}, [str(other_key), "is not the private key"]),
        ({"SSL_CERT_PATH": str(garbage), "SSL_KEY_PATH": str(key)}, [str(garbage), "no PEM certificate"]),
        ({"SSL_CERT_PATH": str(cert)}, ["SSL_KEY_PATH is not"]),
    ]:
        with pytest.raises(RuntimeError) as e:
            make_server(env=env, name=unique("d"))
        for w in want:
            assert w in str(e.value), str(e.value)[-600:]


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fam, **labels):
    return [s for s in fam.samples if all(s.labels.get(k) == v for k, v in labels.items())]


def test_metrics_after_a_known_workload(make_server, tmp_path):
    from kms_servers import OpenBao, registry_yaml
    bao = OpenBao(tmp_path)
    try:
        bao.create_key("m")
        cfg = tmp_path / "kms.yaml"
        cfg.write_text(registry_yaml({"vault-slot": bao.slot("m")}))
        root = secrets.token_hex(16)
        srv = make_server(env={"CYBORGDB_SERVICE_ROOT_KEY": root}, args=["--config", str(cfg)])
        api = Api(srv.url, root)
        # Auth: /metrics needs the root key.
        assert requests.get(srv.url + "/metrics", timeout=5).status_code == 401
        name, key = "secret-index-name", new_key()
        assert api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 4})[0] == 200
        rng = np.random.default_rng(1)
        items = [{"id": str(i), "vector": rng.normal(size=4).tolist()} for i in range(400)]
        assert api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})[0] == 200
        for _ in range(3):
            assert api.post("/v1/vectors/query", {"index_name": name, "index_key": key,
                                                  "query_vectors": [0, 0, 0, 0], "top_k": 3})[0] == 200
        assert api.post("/v1/indexes/train", {"index_name": name, "index_key": key, "n_lists": 4})[0] == 200
        assert api.post("/v1/vectors/query", {"index_name": "missing", "index_key": key,
                                              "query_vectors": [0, 0, 0, 0]})[0] == 404
        assert api.post("/v1/indexes/create", {"index_name": unique(), "kms_name": "vault-slot",
                                               "dimension": 4})[0] == 200
        emb, ek = unique(), new_key()
        api.post("/v1/indexes/create", {"index_name": emb, "index_key": ek, "embedding_model": "all-MiniLM-L6-v2"})
        assert api.post("/v1/vectors/upsert", {"index_name": emb, "index_key": ek, "items": [
            {"id": "t", "contents": "hello metrics"}]})[0] == 200
        r = requests.get(srv.url + "/metrics", headers={"X-API-Key": root}, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert name not in r.text, "index names are not labels by default"
        f = families(r.text)
        req = f["sealdb_requests"]
        assert samples(req, operation="upsert", status="200")[0].value >= 1
        assert samples(req, operation="query", status="200")[0].value == 3
        assert samples(req, operation="query", status="404")[0].value == 1
        assert f["sealdb_request_duration_seconds"].type == "histogram"
        assert samples(f["sealdb_request_duration_seconds"], operation="query")
        assert f["sealdb_open_indexes"].samples[0].value >= 1
        assert f["sealdb_index_cache_hits"].samples[0].value >= 3
        assert f["sealdb_index_cache_misses"].samples[0].value >= 0
        assert f["sealdb_index_cache_bytes"].samples[0].value > 0
        # The block cache: the queries and the training read and wrote blocks, within budget.
        cached = f["sealdb_block_cache_bytes"].samples[0].value
        assert 0 < cached <= f["sealdb_block_cache_budget_bytes"].samples[0].value
        assert f["sealdb_block_cache_reserved_bytes"].samples[0].value == 0  # no training runs
        assert f["sealdb_block_cache_blocks"].samples[0].value >= 1
        assert f["sealdb_block_cache_hits"].samples[0].value >= 1
        assert f["sealdb_block_cache_misses"].type == "counter"
        assert samples(f["sealdb_training_runs"], kind="explicit", result="ok")[0].value == 1
        assert f["sealdb_training_duration_seconds"].type == "histogram"
        assert samples(f["sealdb_store_batch_duration_seconds"], result="ok")
        assert "sealdb_wal_bytes" in f
        assert samples(f["sealdb_kms_calls"], slot="vault-slot", operation="wrap")[0].value >= 1
        assert samples(f["sealdb_kms_call_duration_seconds"], slot="vault-slot")
        assert samples(f["sealdb_embedding_batches"], model="all-MiniLM-L6-v2")[0].value >= 1
    finally:
        bao.stop()


def test_metrics_open_and_index_labels(make_server):
    root = secrets.token_hex(16)
    srv = make_server(env={"CYBORGDB_SERVICE_ROOT_KEY": root},
                      args=["--metrics-open", "--metrics-index-labels"])
    api = Api(srv.url, root)
    name, key = unique("labelled"), new_key()
    api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2})
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [
        {"id": "a", "vector": [1, 2]}, {"id": "b", "vector": [2, 1]}]})
    r = requests.get(srv.url + "/metrics", timeout=5)
    assert r.status_code == 200
    f = families(r.text)
    assert samples(f["sealdb_index_vectors"], index=name)[0].value == 2


def test_request_ids_and_json_logs_without_secrets(make_server):
    root = secrets.token_hex(16)
    srv = make_server(env={"CYBORGDB_SERVICE_ROOT_KEY": root},
                      args=["--log-format", "json", "--log-level", "DEBUG"])
    api = Api(srv.url, root)
    r = requests.get(srv.url + "/v1/health", timeout=5)
    generated = r.headers["x-request-id"]
    assert len(generated) == 32 and all(c in "0123456789abcdef" for c in generated)
    mine = "trace-" + secrets.token_hex(4)
    r = requests.get(srv.url + "/v1/indexes/list", headers={"X-Request-Id": mine, "X-API-Key": root}, timeout=5)
    assert r.headers["x-request-id"] == mine
    r = requests.get(srv.url + "/v1/health", headers={"X-Request-Id": "bad id\twith spaces"}, timeout=5)
    assert r.headers["x-request-id"] != "bad id\twith spaces" and len(r.headers["x-request-id"]) == 32
    # A whole workflow with keys everywhere a client may put them.
    name, key = unique(), new_key()
    api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2})
    api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [
        {"id": "a", "vector": [1, 2], "contents": "plaintext-contents-xyz", "metadata": {"m": "meta-value-xyz"}}]})
    st, user = api.post(f"/v1/indexes/{name}/users", {"permissions": ["read"], "index_key": key})
    assert st == 200, user
    requests.get(srv.url + f"/v1/indexes/{name}/users?index_key={key}", headers={"X-API-Key": root}, timeout=5)
    wrong = requests.post(srv.url + "/v1/vectors/query", headers={"X-API-Key": root, "X-Request-Id": "wrong-key-1"},
                          json={"index_name": name, "index_key": new_key(), "query_vectors": [1, 2]}, timeout=5)
    assert wrong.status_code == 401
    srv.stop()
    text = srv.logs()
    for secret in (root, key, key.upper(), user["api_key"], "plaintext-contents-xyz", "meta-value-xyz"):
        assert secret not in text, "a secret reached the log"
    lines = [json.loads(l) for l in text.splitlines() if l.startswith("{")]
    assert lines and len(lines) == len([l for l in text.splitlines() if l.strip()]), "every line is JSON"
    done = [l for l in lines if l.get("fields", {}).get("message") == "request"
            and l.get("span", {}).get("request_id") == mine]
    assert done and done[0]["span"]["op"] == "list_indexes"
    refused = [l for l in lines if l.get("span", {}).get("request_id") == "wrong-key-1"
               and l["level"] == "WARN"]
    assert refused and refused[0]["fields"]["status"] == 401 and refused[0]["span"]["op"] == "query"


def test_readiness(make_server, tmp_path):
    srv = make_server()
    st, b = Api(srv.url).get("/v1/ready")
    assert st == 200 and b["status"] == "ready" and b["store"] == "ok", b
    assert "all-MiniLM-L6-v2" in b["models_installed"]
    cfg = tmp_path / "dead.yaml"
    cfg.write_text("kms:\n  registry:\n    dead:\n      provider: vault\n      address: http://127.0.0.1:9\n"
                   "      key_name: k\n      token: t\n      timeout_seconds: 2\n")
    srv2 = make_server(args=["--config", str(cfg)], name="d2")
    st, b = Api(srv2.url).get("/v1/ready")
    assert st == 200 and b["status"] == "degraded" and b["kms"] == {"dead": "failed"}, b


def test_training_progress_is_reported(make_server):
    srv = make_server(env={"AUTO_TRAIN_DISABLED": "true"})
    api = Api(srv.url)
    name, key = unique(), new_key()
    api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 32})
    rng = np.random.default_rng(7)
    for b in range(6):
        items = [{"id": f"{b}-{i}", "vector": rng.normal(size=32).tolist()} for i in range(5000)]
        assert api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})[0] == 200
    done = {}

    def train():
        done["r"] = api.post("/v1/indexes/train", {"index_name": name, "index_key": key, "n_lists": 128,
                                                   "max_iters": 400, "tolerance": 0})
    t = threading.Thread(target=train)
    t.start()
    seen = []
    while t.is_alive():
        st, b = api.get("/v1/indexes/training-status")
        assert st == 200
        seen += [p for p in b["progress"] if p["index_name"] == name]
        time.sleep(0.2)
    t.join()
    assert done["r"][0] == 200, done
    phases = {p["phase"] for p in seen}
    assert "kmeans" in phases, seen[:3]
    km = [p for p in seen if p["phase"] == "kmeans"]
    assert all(0 <= p["fraction"] <= 1 and p["steps"] == 400 and p["elapsed_seconds"] >= 0 for p in km)
    assert km[-1]["step"] >= km[0]["step"] and km[-1]["fraction"] >= km[0]["fraction"]
    # After it, nothing is reported as running.
    assert api.get("/v1/indexes/training-status")[1]["progress"] == []
    if max(p["elapsed_seconds"] for p in seen) > 3:
        assert "training in progress" in srv.logs()
