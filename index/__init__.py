"""kNN memory of one transformer memory layer: keys/values in torch, search with Faiss or torch.

Knows torch, numpy and Faiss only; nothing about models.

    store = KnnStore(batch_size, num_heads, head_dim, index="Flat")   # or "IVF1024,Flat", "HNSW32", ...
    store.add(keys, values, mask)        # [B, H, T, d]; mask [B, T], False = padding (never stored)
    res = store.search(queries, k)       # [B, H, Q, d] -> SearchResult(ids, scores, values)

- One index per (batch row, head); rows grow independently; ids are positions
  in the row's storage.
- Metric: inner product. Returned scores are exact: float32 dot products of the
  query (cast to float32) with the stored key (cast to float32), recomputed for
  every candidate whatever the index; results are sorted by them, best first.
  faiss_metric="l2" lets the Faiss index search norm-augmented keys by L2
  (same top-k for exact indices, higher recall for HNSW/IVF on model keys).
  faiss_search="big_batch" scans IVF lists once per search for all queries
  (faiss.contrib.big_batch_search): same neighbours, faster on large indices
  at a high nprobe.
- K = min(k, largest row size): a k above the memory size returns the whole
  memory; missing neighbours are ids -1, scores -inf, zero values.
- len(store) = stored tokens of the largest row; store.sizes() = per row.
- set_num_threads(n) sets torch and Faiss (OpenMP) threads together.
"""

from .factory import EXAMPLES, default_train_size, make_index
from .result import SearchResult
from .store import BACKENDS, KnnStore
from .threads import get_num_threads, set_num_threads

__all__ = ["KnnStore", "SearchResult", "set_num_threads", "get_num_threads", "make_index",
           "default_train_size", "BACKENDS", "EXAMPLES"]
