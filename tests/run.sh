#!/usr/bin/env bash
# Run every test: Rust unit/integration tests, then the black-box suites against a real server
# process (plain HTTP, spec compatibility, at-rest scan) and the official CyborgDB Python
# client 0.18.0 and 0.17.0. Python venvs are created under .venvs/ on first use.
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
venv client18 "cyborgdb==0.18.0" "pytest>=8" requests numpy
venv client17 "cyborgdb==0.17.0" "pytest>=8" requests numpy

echo "== cargo build + test"
cargo build --workspace --all-targets
cargo test --workspace

export SEALDB_BIN=$ROOT/target/debug/sealdb
cd tests
echo "== black-box HTTP suite + official client 0.18.0"
"$VENVS/client18/bin/python" -m pytest -q -p no:cacheprovider .
echo "== official client 0.17.0"
"$VENVS/client17/bin/python" -m pytest -q -p no:cacheprovider compat
