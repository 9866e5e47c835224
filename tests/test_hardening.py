"""Hostile input and clean shutdown (issue: hardening): request limits, training that can be
stopped, SIGTERM within its deadline with nothing acknowledged lost."""
import base64
import signal
import threading
import time

import numpy as np
import pytest

from conftest import Api, new_key, unique


def make_index(api, key, n, dim=32, seed=0, name=None):
    name = name or unique()
    assert api.post("/v1/indexes/create", {"index_name": name, "index_key": key,
                                           "dimension": dim})[0] == 200
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype("<f4")
    for s0 in range(0, n, 5000):
        part = x[s0:s0 + 5000]
        status, body = api.post("/v1/vectors/upsert_binary", {
            "index_name": name, "index_key": key,
            "batch": {"ids": [str(i) for i in range(s0, s0 + len(part))], "dimension": dim,
                      "vectors_b64": base64.b64encode(part.tobytes()).decode()}})
        assert status == 200, body
    return name, x


def long_train_body(name, key):
    # 1024 lists, 1000 iterations and no early stop on 20,000 vectors: about a minute.
    return {"index_name": name, "index_key": key, "n_lists": 1024, "max_iters": 1000,
            "tolerance": 0}


class Background:
    """Run one request in a thread; remember status, body and how long it took."""

    def __init__(self, fn):
        self.result = None
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except Exception as e:  # connection closed by a stopping server
            self.result = ("error", repr(e))
        self.elapsed = time.monotonic() - self.t0

    def join(self, timeout):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "request still running"
        return self.result


def wait_training(api, name, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = api.get("/v1/indexes/training-status")[1]
        if name in (st.get("training_indexes") or []) or st.get("currently_training") == name:
            return
        time.sleep(0.05)
    raise AssertionError("training never started")


def test_over_limit_requests_are_refused_naming_the_limit(make_server):
    srv = make_server(args=["--max-ids-per-request", "50"])
    api, key = Api(srv.url), new_key()
    name, _ = make_index(api, key, 3000)
    t0 = time.monotonic()
    status, body = api.post("/v1/indexes/train", {
        "index_name": name, "index_key": key,
        "max_iters": 9223372036854775806, "tolerance": 0})
    assert status == 422, body
    assert "max_iters" in body["detail"] and "--max-train-iters" in body["detail"]
    q = np.zeros((20000, 32), "<f4")
    status, body = api.post("/v1/vectors/query_binary", {
        "index_name": name, "index_key": key, "top_k": 1000,
        "batch": {"dimension": 32, "vectors_b64": base64.b64encode(q.tobytes()).decode()}})
    assert status == 422, body
    assert "20000000" in body["detail"] and "--max-query-results" in body["detail"]
    status, body = api.post("/v1/vectors/query", {
        "index_name": name, "index_key": key, "top_k": 1000,
        "query_vectors": [[0.0] * 32] * 1001})
    assert status == 422 and "--max-query-results" in body["detail"], body
    assert time.monotonic() - t0 < 20
    # Ids: count (lowered to 50 by the flag) and length.
    status, body = api.post("/v1/vectors/get", {"index_name": name, "index_key": key,
                                                "ids": [str(i) for i in range(51)]})
    assert status == 422 and "--max-ids-per-request" in body["detail"], body
    assert api.post("/v1/vectors/get", {"index_name": name, "index_key": key,
                                        "ids": [str(i) for i in range(50)]})[0] == 200
    status, body = api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                                   "items": [{"id": "x" * 1025, "vector": [0.0] * 32}]})
    assert status == 422 and "--max-id-bytes" in body["detail"], body
    # Filters: depth and size.
    deep = {"a": 1}
    for _ in range(40):
        deep = {"$and": [deep]}
    status, body = api.post("/v1/vectors/query", {"index_name": name, "index_key": key,
                                                  "query_vectors": [0.0] * 32, "filters": deep})
    assert status == 422 and "--max-filter-depth" in body["detail"], body
    wide = {"a": {"$in": list(range(20000))}}
    status, body = api.post("/v1/vectors/query", {"index_name": name, "index_key": key,
                                                  "query_vectors": [0.0] * 32, "filters": wide})
    assert status == 422 and "--max-filter-nodes" in body["detail"], body
    status, body = api.post("/v1/indexes/create", {"index_name": unique(), "index_key": key,
                                                   "dimension": 70000})
    assert status == 422 and "--max-dimension" in body["detail"], body
    # Nothing was written by the refused upsert.
    assert api.post("/v1/vectors/num_vectors", {"index_name": name, "index_key": key})[1]["result"] == 3000


def start_long_training(make_server):
    """A server with a 20,000-vector index whose (long) training is running."""
    srv = make_server(args=["--auto-train-disabled"])
    api, key = Api(srv.url), new_key()
    name, _ = make_index(api, key, 20000)
    first = Background(lambda: api.post("/v1/indexes/train", long_train_body(name, key)))
    wait_training(api, name)
    return srv, api, key, name, first


def test_a_newer_train_request_supersedes_a_running_one(make_server):
    srv, api, key, name, first = start_long_training(make_server)
    time.sleep(0.5)
    t0 = time.monotonic()
    status, body = api.post("/v1/indexes/train", {"index_name": name, "index_key": key,
                                                  "n_lists": 16, "max_iters": 5})
    assert status == 200, body
    assert time.monotonic() - t0 < 15
    status, body = first.join(5)
    assert status == 409 and "newer train request" in body["detail"], body
    d = api.post("/v1/indexes/describe", {"index_name": name, "index_key": key})[1]
    assert d["is_trained"] and d["n_lists"] == 16, d


def test_deleting_an_index_stops_its_training(make_server):
    srv, api, key, name, first = start_long_training(make_server)
    t0 = time.monotonic()
    assert api.post("/v1/indexes/delete", {"index_name": name, "index_key": key})[0] == 200
    assert time.monotonic() - t0 < 10
    status, body = first.join(5)
    assert status == 404, body
    assert name not in api.get("/v1/indexes/list")[1]["indexes"]


def test_training_time_limit(make_server):
    srv = make_server(args=["--auto-train-disabled", "--max-train-seconds", "1"])
    api, key = Api(srv.url), new_key()
    name, _ = make_index(api, key, 20000)
    t0 = time.monotonic()
    status, body = api.post("/v1/indexes/train", long_train_body(name, key))
    assert status == 422 and "--max-train-seconds" in body["detail"], body
    assert time.monotonic() - t0 < 10
    # The index keeps working, untrained, and can still be trained within the limit.
    d = api.post("/v1/indexes/describe", {"index_name": name, "index_key": key})[1]
    assert not d["is_trained"]
    assert api.post("/v1/indexes/train", {"index_name": name, "index_key": key,
                                          "n_lists": 8, "max_iters": 3})[0] == 200


def test_sigterm_during_training_and_upserts_exits_in_time_losing_nothing(make_server):
    srv, api, key, name, trainer = start_long_training(make_server)
    acked, stop = [], threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            try:
                status, _ = api.post("/v1/vectors/upsert", {
                    "index_name": name, "index_key": key,
                    "items": [{"id": f"w{i}", "vector": [float(i)] * 32, "contents": f"c{i}"}]})
            except Exception:
                return
            if status == 200:
                acked.append(f"w{i}")
            i += 1

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(timeout=15)
    elapsed = time.monotonic() - t0
    stop.set()
    w.join(5)
    assert code == 0, srv.logs()[-2000:]
    assert elapsed < 12, elapsed
    trainer.join(5)
    assert acked, "no upsert was acknowledged before the signal"
    srv.log.close()
    srv.proc = None
    srv.start()
    got = api.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": acked,
                                       "include": ["contents"]})[1]["results"]
    assert sorted(r["id"] for r in got) == sorted(acked)
    assert all(r["contents"] in (f"c{r['id'][1:]}",
                                 base64.b64encode(f"c{r['id'][1:]}".encode()).decode()) for r in got)


def test_debug_logs_of_a_full_workflow_hold_no_secret(make_server):
    """Every key, token and plaintext of a workflow, searched for in TRACE-level logs."""
    import requests
    root_key = "root-" + new_key()
    srv = make_server(env={"CYBORGDB_SERVICE_ROOT_KEY": root_key, "CYBORGDB_SERVICE_LOG_LEVEL": "DEBUG",
                           "SEALDB_LOG": "trace"},
                      args=["--auto-train-min-vectors", "64"])
    root, key = Api(srv.url, root_key), new_key()
    name = unique()
    contents, meta_value = "plaintext-contents-" + new_key()[:16], "meta-" + new_key()[:16]
    vec_marker = 12345.678
    assert root.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 4})[0] == 200
    items = [{"id": f"i{i}", "vector": [vec_marker, i, 0, 1], "contents": contents,
              "metadata": {"tag": meta_value}} for i in range(100)]
    assert root.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items})[0] == 200
    wait = time.monotonic() + 20
    while root.get("/v1/indexes/training-status")[1]["training_indexes"] and time.monotonic() < wait:
        time.sleep(0.1)
    st, b = root.post("/v1/vectors/query", {"index_name": name, "index_key": key, "top_k": 3,
                                            "query_vectors": [vec_marker, 1, 0, 1],
                                            "filters": {"tag": meta_value},
                                            "include": ["metadata", "contents", "vector"]})
    assert st == 200 and b["results"][0]["metadata"]["tag"] == meta_value
    st, user = root.post(f"/v1/indexes/{name}/users", {"permissions": ["read"], "index_key": key})
    assert st == 200
    token = user["api_key"]
    # A user key, a wrong key, a bad token, and the 0.17-style ?index_key= query parameter.
    assert Api(srv.url, token).post("/v1/vectors/get", {"index_name": name, "ids": ["i1"]})[0] == 200
    wrong = new_key()
    assert root.post("/v1/vectors/get", {"index_name": name, "index_key": wrong, "ids": ["i1"]})[0] == 401
    assert Api(srv.url, token[:-3] + "AAA").post("/v1/vectors/get", {"index_name": name, "ids": ["i1"]})[0] == 401
    r = requests.get(f"{srv.url}/v1/indexes/{name}/users", params={"index_key": key},
                     headers={"X-API-Key": root_key})
    assert r.status_code == 200
    r = requests.delete(f"{srv.url}/v1/indexes/{name}/users/{user['user_id']}", params={"index_key": key},
                        headers={"X-API-Key": root_key})
    assert r.status_code == 204
    assert root.post("/v1/indexes/delete", {"index_name": name, "index_key": key})[0] == 200
    srv.stop()
    logs = srv.logs()
    assert "request" in logs and len(logs) > 2000, "the server logged almost nothing"
    assert "DEBUG" in logs or "TRACE" in logs, "debug logging was not on"
    for what, secret in [("index key", key), ("index key, upper case", key.upper()),
                         ("wrong key", wrong), ("root key", root_key), ("user token", token),
                         ("token body", token[7:]), ("contents", contents), ("metadata", meta_value),
                         ("vector", "12345.678")]:
        assert secret not in logs, f"the {what} appears in the logs"


def test_a_short_root_key_is_warned_about_without_being_logged(make_server):
    srv = make_server(env={"CYBORGDB_SERVICE_ROOT_KEY": "pw-9f3k"})
    assert Api(srv.url, "pw-9f3k").get("/v1/indexes/list")[0] == 200
    srv.stop()
    logs = srv.logs()
    assert "shorter than 32 characters" in logs
    assert "pw-9f3k" not in logs
    long = make_server(env={"CYBORGDB_SERVICE_ROOT_KEY": "r" * 40}, name="long")
    long.stop()
    assert "shorter than 32" not in long.logs()
