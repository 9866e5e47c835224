#!/usr/bin/env bash
# A walk through the REST API with curl against a running SealDB (default 127.0.0.1:8000).
#   cargo run --release --bin sealdb &      then      examples/curl.sh
set -euo pipefail
URL=${SEALDB_URL:-http://127.0.0.1:8000}
KEY=$(openssl rand -hex 32 2>/dev/null || python3 -c 'import secrets; print(secrets.token_hex(32))')
NAME=example-$RANDOM
post() { curl -sS -H 'Content-Type: application/json' ${SEALDB_API_KEY:+-H "X-API-Key: $SEALDB_API_KEY"} "$URL$1" -d "$2"; echo; }

echo "# health";          curl -sS "$URL/v1/health"; echo
echo "# create";          post /v1/indexes/create "{\"index_name\":\"$NAME\",\"index_key\":\"$KEY\",\"dimension\":3,\"metric\":\"cosine\"}"
echo "# upsert";          post /v1/vectors/upsert "{\"index_name\":\"$NAME\",\"index_key\":\"$KEY\",\"items\":[
  {\"id\":\"a\",\"vector\":[1,0,0],\"metadata\":{\"lang\":\"en\",\"year\":2021},\"contents\":\"hello\"},
  {\"id\":\"b\",\"vector\":[0,1,0],\"metadata\":{\"lang\":\"fr\",\"year\":2023}},
  {\"id\":\"c\",\"vector\":[1,1,0],\"metadata\":{\"lang\":\"en\",\"year\":2024,\"tags\":[\"x\",\"y\"]}}]}"
echo "# query";           post /v1/vectors/query "{\"index_name\":\"$NAME\",\"index_key\":\"$KEY\",\"query_vectors\":[1,0.2,0],\"top_k\":2,\"include\":[\"distance\",\"metadata\"]}"
echo "# filtered query";  post /v1/vectors/query "{\"index_name\":\"$NAME\",\"index_key\":\"$KEY\",\"query_vectors\":[1,0.2,0],\"filters\":{\"lang\":\"en\",\"year\":{\"\$gte\":2022}}}"
echo "# get";             post /v1/vectors/get "{\"index_name\":\"$NAME\",\"index_key\":\"$KEY\",\"ids\":[\"a\",\"zz\"]}"
echo "# train";           post /v1/indexes/train "{\"index_name\":\"$NAME\",\"index_key\":\"$KEY\"}"
echo "# describe";        post /v1/indexes/describe "{\"index_name\":\"$NAME\",\"index_key\":\"$KEY\"}"
echo "# wrong key (401)"; post /v1/indexes/describe "{\"index_name\":\"$NAME\",\"index_key\":\"$(printf '0%.0s' {1..64})\"}"
echo "# delete";          post /v1/indexes/delete "{\"index_name\":\"$NAME\",\"index_key\":\"$KEY\"}"
