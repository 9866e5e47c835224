#!/usr/bin/env python3
"""The official CyborgDB Python client against SealDB, unchanged.

    pip install cyborgdb numpy
    cargo run --release --bin sealdb &
    python3 examples/python_client.py
"""
import os

import cyborgdb
import numpy as np

client = cyborgdb.Client(os.environ.get("SEALDB_URL", "http://127.0.0.1:8000"),
                         api_key=os.environ.get("SEALDB_API_KEY"))
key = client.generate_key()          # keep it: the server never stores it
index = client.create_index(f"example-{os.getpid()}", key, dimension=64, metric="euclidean")

rng = np.random.default_rng(0)
vectors = rng.normal(size=(5000, 64)).astype(np.float32)
ids = [f"doc-{i}" for i in range(len(vectors))]
index.upsert(ids, vectors)                                             # binary path
index.upsert([{"id": "note", "vector": vectors[0].tolist(),          # JSON path
               "metadata": {"kind": "note"}, "contents": "stored encrypted"}])

index.train()                                                          # k-means; blocks until done
print("trained:", index.is_trained(), "lists:", index.n_lists)
print(index.query(query_vectors=vectors[42].tolist(), top_k=3, include=["distance"]))
print(index.query(query_vectors=vectors[0].tolist(), top_k=5, filters={"kind": "note"}))
print(index.get(["note"], include=["contents", "metadata"]))
index.delete_index()
