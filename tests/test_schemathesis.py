"""schemathesis against our own spec, every phase, with a real filled index in half of the
requests (tests/fuzz/schemathesis_hooks.py). It must find no 5xx, no response that breaks
the spec (status, content type, schema) and no request that times out. Bounded in time by
SEALDB_SCHEMATHESIS_SECONDS (default 150)."""
import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import Api, new_key, unique

SCHEMATHESIS = os.environ.get("SEALDB_SCHEMATHESIS_BIN") or shutil.which("schemathesis")
HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not SCHEMATHESIS and not os.environ.get("CI"), reason="schemathesis not installed")
def test_schemathesis_finds_no_server_error_and_no_spec_violation(make_server, tmp_path):
    assert SCHEMATHESIS, "SEALDB_SCHEMATHESIS_BIN must name the schemathesis command under CI"
    root = "root-" + new_key()
    srv = make_server(env={"CYBORGDB_SERVICE_ROOT_KEY": root},
                      args=["--auto-train-min-vectors", "500", "--max-train-seconds", "10"])
    api, key, name = Api(srv.url, root), new_key(), unique("fz")
    assert api.post("/v1/indexes/create", {"index_name": name, "index_key": key, "dimension": 8})[0] == 200
    x = np.random.default_rng(3).standard_normal((600, 8)).astype("<f4")
    st, body = api.post("/v1/vectors/upsert_binary", {
        "index_name": name, "index_key": key,
        "batch": {"ids": [str(i) for i in range(600)], "dimension": 8,
                  "vectors_b64": base64.b64encode(x.tobytes()).decode(),
                  "metadata": [{"n": i, "tag": ["a", "b"][i % 2]} for i in range(600)],
                  "contents": [f"text {i}" for i in range(600)]}})
    assert st == 200, body
    seconds = os.environ.get("SEALDB_SCHEMATHESIS_SECONDS", "150")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": str(HERE / "fuzz"), "SEALDB_FUZZ_INDEX": name, "SEALDB_FUZZ_KEY": key}
    cmd = [SCHEMATHESIS, "run", f"{srv.url}/v1/openapi.json", "--url", srv.url,
           "-H", f"X-API-Key: {root}",
           "--phases", "examples,coverage,fuzzing,stateful",
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                       "response_schema_conformance",
           "--max-time", seconds, "--request-timeout", "30", "--workers", "2",
           "--suppress-health-check", "all", "--seed", "1", "--no-color"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=int(seconds) + 240)
    (tmp_path / "schemathesis.out").write_text(out.stdout + out.stderr)
    report = out.stdout[-6000:] + out.stderr[-2000:]
    print(report)
    assert out.returncode == 0, report
    # The server lived through it and the index still answers with its data.
    st, body = api.post("/v1/vectors/num_vectors", {"index_name": name, "index_key": key})
    assert st == 200 and body["result"] >= 1, body
