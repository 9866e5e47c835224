"""Nothing a user writes may appear in the clear in the store's files."""
import base64
import struct

import pytest

from conftest import Api, new_key


@pytest.mark.parametrize("ending", ["clean stop", "kill -9"])
def test_raw_store_holds_no_plaintext(make_server, tmp_path, ending):
    # After a kill the records exist only in the write-ahead log, so both files are checked.
    s = make_server(name="rest")
    a = Api(s.url)
    key = new_key()
    a.post("/v1/indexes/create", {"index_name": "secret-index", "index_key": key, "dimension": 4})
    a.post("/v1/indexes/create", {"index_name": "secret-half", "index_key": key, "dimension": 4,
                                  "storage_precision": "float16"})
    # BM25: the text index's terms, postings and lengths must stay sealed too.
    a.post("/v1/indexes/create", {"index_name": "secret-text", "index_key": key, "dimension": 4,
                                  "text_fields": ["classified_field_x71"]})
    vec = [1234.5678, -8765.4321, 3.14159265, 2.71828182]
    secrets_ = {"contents": "TOP-SECRET-CONTENTS-9f2b", "meta_key": "classified_field_x71",
                "meta_val": "MetaValue-Zq81", "id": "item-identifier-77aa"}
    for ix in ["secret-index", "secret-half", "secret-text"]:
        st, b = a.post("/v1/vectors/upsert", {"index_name": ix, "index_key": key, "items": [
            {"id": secrets_["id"], "vector": vec, "contents": secrets_["contents"],
             "metadata": {secrets_["meta_key"]: secrets_["meta_val"], "n": 424242}}]})
        assert st == 200
        st, b = a.post("/v1/indexes/train", {"index_name": ix, "index_key": key})
        assert st == 200
    st, b = a.post("/v1/vectors/query_metadata", {"index_name": "secret-text", "index_key": key,
                                                   "text": "metavalue-zq81"})
    assert st == 200 and b["ids"] == [secrets_["id"]], b
    if ending == "kill -9":
        s.proc.kill()
        s.proc.wait()
    s.stop()
    blob = b"".join(p.read_bytes() for p in (tmp_path / "rest").rglob("*") if p.is_file())
    assert len(blob) > 0
    needles = [v.encode() for v in secrets_.values()] + [key.encode(), bytes.fromhex(key), b"424242"]
    needles += [b"metavalue"]  # the analysed term of the full_text value
    needles.append(struct.pack("<4f", *vec))
    # Multi-component patterns only: a lone 2- or 4-byte value can occur in ciphertext by chance.
    needles += [struct.pack("<2f", *vec[i:i + 2]) for i in range(3)]
    needles.append(struct.pack("<4e", *vec))
    for n in needles:
        assert n not in blob, n
        assert base64.b64encode(n) not in blob
    # Index names are allowed in the clear (they locate records); nothing else is.
    assert b"secret-index" in blob
