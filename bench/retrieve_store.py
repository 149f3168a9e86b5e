"""Bench: embedded vector stores for dense retrieval - numpy exact scan, faiss (flat, HNSW, IVF), LanceDB.

For each corpus size: N unit vectors (384-d, MiniLM's width) and Q unit queries. Prints, per store, the
build time, the query time per query (all Q queries in one call) and recall@10 against the exact top 10
(numpy's scan). `--data random`: uniform random vectors and queries, no structure at all, the worst case
for approximate indexes. `--data clustered`: vectors around 1,000 centres and queries near corpus vectors,
closer to what sentence embeddings of a corpus and questions about it look like.
    .venv/bin/python bench/retrieve_store.py [--data random clustered] [--sizes 10000 100000] [--queries 200]
Needs faiss-cpu and lancedb (pip install faiss-cpu lancedb); a store whose package is missing is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections.abc import Callable

import numpy as np

K = 10


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """(n, dim) float32 rows of length 1."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top(vecs: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) indices of the k largest inner products per query, best first."""
    scores = queries @ vecs.T  # (Q, N)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def clustered(rng: np.random.Generator, n: int, n_queries: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors around 1,000 random centres; queries are noisy copies of some of them."""
    centres = unit(rng, 1000, dim)
    vecs = centres[rng.integers(0, 1000, n)] + 0.6 * unit(rng, n, dim)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = vecs[rng.integers(0, n, n_queries)] + 0.6 * unit(rng, n_queries, dim)
    return vecs, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the exact top k present in the found top k."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def numpy_store(vecs: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda q: exact_top(vecs, q, K)


def faiss_flat(vecs: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    return lambda q: index.search(q, K)[1]


def faiss_hnsw(vecs: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    import faiss

    index = faiss.IndexHNSWFlat(vecs.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(vecs)
    index.hnsw.efSearch = 128
    return lambda q: index.search(q, K)[1]


def faiss_ivf(vecs: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    import faiss

    nlist = max(1, int(np.sqrt(len(vecs))))
    quant = faiss.IndexFlatIP(vecs.shape[1])
    index = faiss.IndexIVFFlat(quant, vecs.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(vecs)
    index.add(vecs)
    index.nprobe = max(1, nlist // 8)
    return lambda q: index.search(q, K)[1]


def _lance_table(vecs: np.ndarray, where: str):
    import lancedb
    import pyarrow as pa

    db = lancedb.connect(where)
    dim = vecs.shape[1]
    data = pa.table(
        {
            "id": pa.array(np.arange(len(vecs))),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim),
        }
    )
    return db.create_table("v", data)


def _lance_search(table, q: np.ndarray, refine: int | None) -> np.ndarray:
    out = []
    for row in q:  # LanceDB searches one query vector per call
        s = table.search(row).metric("dot").limit(K)
        if refine:
            s = s.nprobes(32).refine_factor(refine)
        out.append(s.to_arrow()["id"].to_numpy())
    return np.stack(out)


def lance_flat(vecs: np.ndarray, where: str) -> Callable[[np.ndarray], np.ndarray]:
    table = _lance_table(vecs, where)
    return lambda q: _lance_search(table, q, None)


def lance_ivf_pq(vecs: np.ndarray, where: str) -> Callable[[np.ndarray], np.ndarray]:
    table = _lance_table(vecs, where)
    from lancedb.index import IvfPq

    parts = max(1, int(np.sqrt(len(vecs))))
    table.create_index(
        "vector", config=IvfPq("dot", num_partitions=parts, num_sub_vectors=vecs.shape[1] // 8)
    )
    return lambda q: _lance_search(table, q, 10)


STORES = {
    "numpy exact": (None, numpy_store),
    "faiss flat": ("faiss", faiss_flat),
    "faiss hnsw32": ("faiss", faiss_hnsw),
    "faiss ivf": ("faiss", faiss_ivf),
    "lancedb flat": ("lancedb", lance_flat),
    "lancedb ivf_pq": ("lancedb", lance_ivf_pq),
}


def run(data: str, n: int, n_queries: int, dim: int, seed: int) -> list[tuple[str, float, float, float]]:
    """(store, build s, query ms per query, recall@10) for each store whose package is installed."""
    rng = np.random.default_rng(seed)
    if data == "random":
        vecs, queries = unit(rng, n, dim), unit(rng, n_queries, dim)
    else:
        vecs, queries = clustered(rng, n, n_queries, dim)
    truth = exact_top(vecs, queries, K)
    rows = []
    for name, (package, make) in STORES.items():
        if package is not None and importlib.util.find_spec(package) is None:
            print(f"  {name}: skipped ({package} not installed)")
            continue
        with tempfile.TemporaryDirectory() as where:
            t0 = time.perf_counter()
            search = make(vecs, where) if package == "lancedb" else make(vecs)
            t1 = time.perf_counter()
            found = search(queries)
            t2 = time.perf_counter()
        rows.append((name, t1 - t0, 1000 * (t2 - t1) / n_queries, recall(found, truth)))
    return rows


def main() -> None:
    """Parse the sizes and print one table per corpus size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", choices=["random", "clustered"], default=["random", "clustered"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for data in args.data:
        for n in args.sizes:
            print(f"\n{data}: {n} vectors x {args.dim}-d, {args.queries} queries, k={K}", flush=True)
            print(f"  {'store':<16} {'build s':>8} {'query ms':>9} {'recall@10':>10}")
            for name, build, query, rec in run(data, n, args.queries, args.dim, args.seed):
                print(f"  {name:<16} {build:>8.2f} {query:>9.3f} {rec:>10.3f}")


if __name__ == "__main__":
    main()
