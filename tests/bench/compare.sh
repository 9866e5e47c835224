#!/usr/bin/env bash
# Side-by-side benchmark: the original cyborgdb-service 0.18.0 (from PyPI, offline free tier)
# and SealDB (release build), same data, same client, same auth setting, one run, on loopback.
# Usage: tests/bench/compare.sh [scenario ...]   (default: 100k-128 20k-384 20k-384-cos-f16 hard-100k-128)
# Output: JSON lines in $OUT (default target/bench/results.jsonl) and a ratio table on stdout.
# SEALDB_FLAGS adds flags to our server only (e.g. SEALDB_FLAGS="--index-cache-mb 256").
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=${SEALDB_BENCH_VENV:-$ROOT/.venvs/bench}
OUT=${OUT:-$ROOT/target/bench/results.jsonl}
SCENARIOS=("${@:-100k-128 20k-384 20k-384-cos-f16 hard-100k-128}")
SCENARIOS=(${SCENARIOS[*]})
SWEEP=${SWEEP:-1,2,4,8,16,32,64,128,256}
ROOT_KEY=bench-root-key-$RANDOM$RANDOM
mkdir -p "$(dirname "$OUT")"; : > "$OUT"

if [ ! -f "$VENV/.ok" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "cyborgdb-service==0.18.0" numpy
  touch "$VENV/.ok"
fi
cargo build --release --bin sealdb

wait_up() { for _ in $(seq 1 300); do curl -sf "$1/v1/health" >/dev/null && return 0; sleep 0.2; done; echo "server at $1 did not start" >&2; return 1; }

run_one() { # label port scenario cmd...   (a fresh server and data dir per scenario)
  local label=$1 port=$2 scen=$3; shift 3
  if curl -sf "http://127.0.0.1:$port/v1/health" >/dev/null; then
    echo "port $port is already serving something; stop it first" >&2; exit 1
  fi
  local data; data=$(mktemp -d)
  ( cd "$data" && exec env -i PATH="$PATH" HOME="$data" TMPDIR="$data" PORT="$port" \
      CYBORGDB_DB_TYPE=disk CYBORGDB_DISK_PATH="$data/db" CYBORGDB_SERVICE_ROOT_KEY="$ROOT_KEY" \
      SEALDB_DURABILITY="${SEALDB_DURABILITY:-sync}" \
      AUTO_TRAIN_DISABLED=true "$@" ) > "$data/server.log" 2>&1 &
  local pid=$!
  wait_up "http://127.0.0.1:$port"
  local sweep=(); [[ $scen == hard-* ]] && sweep=(--sweep-probes "$SWEEP")
  "$VENV/bin/python" tests/bench/bench.py --url "http://127.0.0.1:$port" --api-key "$ROOT_KEY" \
    --scenario "$scen" --label "$label" --pid "$pid" "${sweep[@]}" | tee -a "$OUT"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$data"
}

for s in "${SCENARIOS[@]}"; do
  # shellcheck disable=SC2086
  run_one sealdb 18801 "$s" "$ROOT/target/release/sealdb" ${SEALDB_FLAGS:-}
  run_one original 18802 "$s" "$VENV/bin/python" "$ROOT/tests/bench/launch_original.py"
done
"$VENV/bin/python" tests/bench/report.py "$OUT"
