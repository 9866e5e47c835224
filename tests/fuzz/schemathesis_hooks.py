"""Schemathesis hooks (loaded through SCHEMATHESIS_HOOKS): point half of the generated
requests at a real, filled index (8-dimensional, ids "0".."599", metadata `n` and `tag`), and
make their vectors, ids and include lists fit it, so that the fuzzing reaches past "index not
found" and "wrong dimension" into queries, filters, gets, upserts and training on real data.
Everything else a request holds stays as schemathesis generated it."""
import base64
import os
import random
import struct

import schemathesis

NAME = os.environ["SEALDB_FUZZ_INDEX"]
KEY = os.environ["SEALDB_FUZZ_KEY"]
DIM = 8
# Requests that would end the index for every later request keep their generated names.
KEEP = ("/v1/indexes/delete", "/v1/indexes/rewrap")
INCLUDE = {
    "/v1/vectors/get": ["vector", "contents", "metadata"],
    "default": ["distance", "metadata", "vector", "contents"],
}


def _vec(v):
    return [random.uniform(-2, 2) for _ in range(DIM)] if random.random() < 0.95 else v


def _fit(path, body):
    body = dict(body)
    body["index_name"] = NAME
    if random.random() < 0.9:
        body["index_key"] = KEY
    if isinstance(body.get("include"), list) and random.random() < 0.8:
        opts = INCLUDE.get(path, INCLUDE["default"])
        body["include"] = random.sample(opts, random.randint(0, len(opts)))
    if isinstance(body.get("ids"), list) and random.random() < 0.7:
        body["ids"] = [str(random.randrange(700)) for _ in range(random.randint(1, 20))]
    q = body.get("query_vectors")
    if isinstance(q, list) and q:
        body["query_vectors"] = ([_vec(x) for x in q[:5]] if isinstance(q[0], list) else _vec(q))
    if isinstance(body.get("top_k"), int) and random.random() < 0.8:
        body["top_k"] = random.randint(1, 50)
    if isinstance(body.get("items"), list):
        body["items"] = [dict(it, vector=_vec(it.get("vector"))) if isinstance(it, dict) else it
                         for it in body["items"][:20]]
    b = body.get("batch")
    if isinstance(b, dict) and random.random() < 0.9:
        n = len(b["ids"]) if isinstance(b.get("ids"), list) else random.randint(1, 5)
        floats = [random.uniform(-2, 2) for _ in range(n * DIM)]
        b = dict(b, dimension=DIM, vectors_b64=base64.b64encode(struct.pack(f"<{n * DIM}f", *floats)).decode())
        body["batch"] = b
    return body


@schemathesis.hook
def map_body(context, body):
    op = context.operation
    path = op.path if op is not None else ""
    if not isinstance(body, dict) or "index_name" not in body or path in KEEP or random.random() < 0.4:
        return body
    return _fit(path, body)


@schemathesis.hook
def map_path_parameters(context, path_parameters):
    if path_parameters and "index_name" in path_parameters and random.random() < 0.5:
        return {**path_parameters, "index_name": NAME}
    return path_parameters


@schemathesis.hook
def map_query(context, query):
    if isinstance(query, dict) and "index_key" in query and random.random() < 0.5:
        return {**query, "index_key": KEY}
    return query
