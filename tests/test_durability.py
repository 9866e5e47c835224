"""Acknowledged writes survive a crash of the server (kill -9), in both durability modes.

The disk store appends each batch to a write-ahead log and checkpoints it into redb in the
background; after a kill the log is all there is, and the restart must replay it.
"""
import base64
import subprocess

import numpy as np
import pytest

from conftest import BIN, Api, new_key, unique


def wal_bytes(data_dir):
    return sum(p.stat().st_size for p in data_dir.glob("wal-*.log") if p.name != "wal-spare.log")


@pytest.mark.parametrize("durability", ["sync", "relaxed"])
def test_kill_9_loses_no_acknowledged_write(make_server, durability):
    s = make_server(env={"SEALDB_DURABILITY": durability, "AUTO_TRAIN_DISABLED": "true"})
    a = Api(s.url)
    name, key, dim = unique(), new_key(), 16
    assert a.post("/v1/indexes/create", {"index_name": name, "index_key": key,
                                         "dimension": dim})[0] == 200
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, dim)).astype("<f4")
    for s0 in range(0, 3000, 200):
        ids = [str(i) for i in range(s0, s0 + 200)]
        st, b = a.post("/v1/vectors/upsert_binary", {"index_name": name, "index_key": key, "batch": {
            "ids": ids, "vectors_b64": base64.b64encode(x[s0:s0 + 200].tobytes()).decode(),
            "dimension": dim, "contents": [f"c{i}" for i in ids]}})
        assert st == 200, b
    # Overwrite some, delete some: the replay must keep the order of batches.
    st, _ = a.post("/v1/vectors/upsert", {"index_name": name, "index_key": key, "items": [
        {"id": "7", "vector": [0.5] * dim, "contents": "new"}]})
    assert st == 200
    st, _ = a.post("/v1/vectors/delete", {"index_name": name, "index_key": key,
                                          "ids": [str(i) for i in range(100, 150)]})
    assert st == 200
    assert wal_bytes(s.data_dir) > 3000 * dim * 4, "the writes should still be in the log"
    s.proc.kill()
    s.proc.wait()
    s.restart()
    a = Api(s.url)
    st, b = a.post("/v1/indexes/describe", {"index_name": name, "index_key": key})
    assert st == 200
    st, n = a.post("/v1/vectors/num_vectors", {"index_name": name, "index_key": key})
    assert st == 200 and n["result"] == 3000 - 50
    st, got = a.post("/v1/vectors/get", {"index_name": name, "index_key": key,
                                         "ids": ["0", "7", "120", "2999"],
                                         "include": ["vector", "contents"]})
    assert st == 200
    by_id = {r["id"]: r for r in got["results"]}
    assert set(by_id) == {"0", "7", "2999"}
    assert np.array_equal(np.array(by_id["0"]["vector"], dtype="<f4"), x[0])
    assert np.array_equal(np.array(by_id["2999"]["vector"], dtype="<f4"), x[2999])
    assert by_id["7"]["vector"] == [0.5] * dim
    assert by_id["7"]["contents"] in ("new", base64.b64encode(b"new").decode())
    assert by_id["2999"]["contents"] in ("c2999", base64.b64encode(b"c2999").decode())
    # A clean restart after the replay changes nothing.
    s.restart()
    a = Api(s.url)
    st, n = a.post("/v1/vectors/num_vectors", {"index_name": name, "index_key": key})
    assert n["result"] == 3000 - 50


def test_unknown_durability_is_a_startup_error(tmp_path):
    r = subprocess.run([str(BIN), "--port", "1"], env={"SEALDB_DURABILITY": "maybe",
                                                       "CYBORGDB_DISK_PATH": str(tmp_path)},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "durability" in r.stderr.lower() and "maybe" in r.stderr
