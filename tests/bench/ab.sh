#!/usr/bin/env bash
# A/B benchmark of two SealDB binaries (say, before and after a change): same data, same
# client, one run, on loopback, each scenario on a fresh server and data directory.
# Usage: tests/bench/ab.sh OLD_BINARY NEW_BINARY [scenario ...]   (default: 100k-128 hard-100k-128)
# Extra server flags for both: SEALDB_AB_FLAGS (e.g. "--index-cache-mb 256").
# Output: JSON lines in $OUT (default target/bench/ab.jsonl).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OLD=$1 NEW=$2; shift 2
VENV=${SEALDB_BENCH_VENV:-$ROOT/.venvs/bench}
OUT=${OUT:-$ROOT/target/bench/ab.jsonl}
SCENARIOS=("${@:-100k-128 hard-100k-128}")
SCENARIOS=(${SCENARIOS[*]})
read -r -a FLAGS <<< "${SEALDB_AB_FLAGS:-}"
mkdir -p "$(dirname "$OUT")"; : > "$OUT"
if [ ! -f "$VENV/.ok" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "cyborgdb-service==0.18.0" numpy
  touch "$VENV/.ok"
fi
wait_up() { for _ in $(seq 1 300); do curl -sf "$1/v1/health" >/dev/null && return 0; sleep 0.2; done; return 1; }
run_one() { # label binary scenario
  local label=$1 bin=$2 scen=$3 port=18811 data; data=$(mktemp -d)
  ( cd "$data" && exec env -i PATH="$PATH" HOME="$data" PORT="$port" CYBORGDB_DB_TYPE=disk \
      CYBORGDB_DISK_PATH="$data/db" AUTO_TRAIN_DISABLED=true "$bin" "${FLAGS[@]}" ) > "$data/server.log" 2>&1 &
  local pid=$!
  wait_up "http://127.0.0.1:$port"
  local sweep=(); [[ $scen == hard-* ]] && sweep=(--sweep-probes "${SWEEP:-16,64,256}")
  "$VENV/bin/python" tests/bench/bench.py --url "http://127.0.0.1:$port" --scenario "$scen" \
    --label "$label" --pid "$pid" "${sweep[@]}" | tee -a "$OUT"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$data"
}
for s in "${SCENARIOS[@]}"; do
  run_one old "$OLD" "$s"
  run_one new "$NEW" "$s"
done
REPORT_A=new REPORT_B=old "$VENV/bin/python" tests/bench/report.py "$OUT"
