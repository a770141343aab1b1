"""kNN memory of one transformer memory layer: keys/values in torch, search with Faiss or torch.

Knows torch, numpy and Faiss only; nothing about models.

    store = KnnStore(batch_size, num_heads, head_dim, "IVF1024,Flat k=32 nprobe=32")   # or "exact", "HNSW32", ...
    store.add(keys, values, mask)        # [B, H, T, d]; mask [B, T], False = padding (never stored)
    res = store.search(queries)          # [B, H, Q, d] -> SearchResult(ids, scores, values), k from the spec
    state = store.state_dict()           # tensors only (Faiss indexes as serialized bytes); load_state_dict

- One index per (batch row, head); rows grow independently; ids are positions
  in the row's storage.
- Metric: inner product. Returned scores are exact: float32 dot products of the
  query (cast to float32) with the stored key (cast to float32), recomputed for
  every candidate whatever the index; results are sorted by them, best first.
- ``MemorySpec`` (``spec.py``) is the one configuration value: index, k,
  k_factor, metric ("l2": norm-augmented keys in an L2 index, higher recall for
  HNSW/IVF), scan ("big_batch": IVF lists scanned once for all queries) and
  Faiss search parameters, validated once.
- K = min(k, largest row size): a k above the memory size returns the whole
  memory; missing neighbours are ids -1, scores -inf, zero values.
- len(store) = stored tokens of the largest row; store.sizes() = per row.
- set_num_threads(n) sets torch and Faiss (OpenMP) threads together.
"""

from .factory import EXAMPLES, default_train_size, make_index
from .result import SearchResult
from .spec import MemorySpec
from .store import KnnStore
from .threads import get_num_threads, set_num_threads

__all__ = ["KnnStore", "MemorySpec", "SearchResult", "set_num_threads", "get_num_threads", "make_index",
           "default_train_size", "EXAMPLES"]
