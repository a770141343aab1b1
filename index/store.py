"""KnnStore: the kNN memory of one attention layer, one index per (row, head)."""

import faiss
import numpy as np
import torch

from . import checks, factory
from .exact import exact_topk
from .result import SearchResult, empty_result, rescore
from .storage import RowStorage

BACKENDS = ("faiss", "torch")
METRICS = ("ip",)


class KnnStore:
    """Keys/values of a batch of sequences, searchable by inner product.

    Each batch row ``b`` and head ``h`` has its own index; rows grow
    independently (padding is never stored). Ids are positions in the row's
    storage. Search returns candidates from the index (exact for "Flat" and the
    "torch" backend, approximate for IVF/HNSW/PQ/SQ), re-scored exactly in
    float32 from the stored keys and sorted by that score.

    Trainable indices (IVF, PQ, SQ...) start untrained: a row's keys are
    searched exactly until ``train_size`` of them have arrived, then each of the
    row's head indices is trained once (seeded) and receives the whole buffer,
    so no key is lost. ``train_size`` defaults to
    ``factory.default_train_size``: max(1024, 40 x nlist for IVF, 40 x 256 for
    8-bit PQ), e.g. 40960 for IVF1024, 1024 for SQ8.

    The index receives the stored keys (after rounding to ``dtype``), cast to
    float32, so exact indices rank keys exactly as the returned scores do.

    ``k_factor`` (as in faiss.IndexRefine): fetch ``k_factor * k`` candidates
    from the index and keep the ``k`` best by exact score; raises the recall of
    compressed indices (PQ, SQ) at the cost of a larger re-score.

    ``faiss_metric``: "ip" indexes the keys with Faiss' inner-product metric;
    "l2" indexes keys augmented to a common norm M with the L2 metric
    (``factory.augment_keys``; M per (row, head): 1.1 x the largest key norm
    the index is first built from), where HNSW and IVF reach a much higher
    recall of the inner-product top-k for the same search parameters.

    ``faiss_search``: "index" searches with the index's own ``search``;
    "big_batch" (IVF with Flat codes, or PQ/SQ codes with faiss_metric "l2";
    on the CPU) with ``faiss.contrib.big_batch_search``, which scans each
    inverted list once for all the queries probing it: the same neighbours,
    faster on large indices at a high nprobe, slower on small ones
    (``experiments/bench_ivf_scan.py``).
    """

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, *, index: str = "Flat",
                 backend: str = "faiss", index_params: dict | None = None, train_size: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int = 0,
                 metric: str = "ip", k_factor: int = 1, faiss_metric: str = "ip", faiss_search: str = "index"):
        self.batch_size = checks.positive_int("batch_size", batch_size)
        self.num_heads = checks.positive_int("num_heads", num_heads)
        self.head_dim = checks.positive_int("head_dim", head_dim)
        self.k_factor = checks.positive_int("k_factor", k_factor)
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r} is not supported; accepted values: {METRICS}")
        if index == "torch":  # shorthand for the exact torch backend
            index, backend = "Flat", "torch"
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown; accepted values: {BACKENDS}")
        if faiss_metric not in factory.FAISS_METRICS:
            raise ValueError(f"faiss_metric={faiss_metric!r} is unknown; accepted values: {factory.FAISS_METRICS}")
        if backend == "torch" and faiss_metric != "ip":
            raise ValueError(f"faiss_metric={faiss_metric!r}: the 'torch' backend searches exactly; use 'ip'")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.index, self.backend, self.index_params = index, backend, dict(index_params or {})
        self.dtype, self.device, self.seed = dtype, torch.device(device), int(seed)
        self.faiss_metric = faiss_metric
        self._proto = factory.make_index(index, self.head_dim, faiss_metric)
        if backend == "torch" and (index != "Flat" or self.index_params):
            raise ValueError(f"index={index!r} / index_params: the 'torch' backend is exact; use index='Flat' "
                             "and no index_params")
        factory.apply_params(self._proto, self.index_params)  # validates the names early
        factory.check_search(faiss_search, self._proto)
        if faiss_search == "big_batch" and (backend != "faiss" or self.device.type != "cpu"):
            raise ValueError(f"faiss_search='big_batch' scans Faiss indexes on the CPU; got backend={backend!r}, "
                             f"device={str(self.device)!r}")
        self.faiss_search = faiss_search
        self.train_size = self._check_train_size(train_size)
        factory.prepare_training(self._proto, self.seed)
        self._gpu = None
        if backend == "faiss" and self.device.type == "cuda" and factory.gpu_available():
            self._gpu = faiss.StandardGpuResources()
        self._storage = RowStorage(self.batch_size, self.num_heads, self.head_dim, dtype, self.device)
        self._reset_indexes()

    def _check_train_size(self, train_size) -> int:
        if self._proto.is_trained or self.backend == "torch":
            return 0
        if train_size is None:
            return factory.default_train_size(self._proto)
        train_size = checks.positive_int("train_size", train_size)
        need = factory.min_train_size(self._proto)
        if train_size < need:
            raise ValueError(f"train_size={train_size} is below the {need} keys index={self.index!r} needs to train")
        return train_size

    def _new_index(self) -> faiss.Index:
        idx = faiss.clone_index(self._proto)
        if self._gpu is not None:
            idx = factory.to_gpu(idx, self._gpu, self.device.index or 0)
        factory.apply_params(idx, self.index_params)
        return idx

    def _reset_indexes(self) -> None:
        B, H = self.batch_size, self.num_heads
        faiss_path = self.backend == "faiss"
        self._indexes = [[self._new_index() for _ in range(H)] for _ in range(B)] if faiss_path else None
        self._trained = [faiss_path and self.train_size == 0] * B  # row's keys live in its indexes
        self._indexed = [0] * B  # keys of the row already added to its indexes
        self._norms = np.zeros((B, H))  # faiss_metric "l2": augmentation norm per (row, head), 0 = not set yet

    # ---------------------------------------------------------------- state
    def __len__(self) -> int:
        """Stored tokens of the largest row (rows may differ; see ``sizes``)."""
        return max(self._storage.sizes)

    def sizes(self) -> list[int]:
        """Stored tokens per batch row (every head of a row holds the same number)."""
        return list(self._storage.sizes)

    @property
    def trained(self) -> list[bool]:
        """Per row: whether its keys are served by the Faiss indexes (False: exact buffer search)."""
        return list(self._trained)

    def faiss_index(self, b: int, h: int) -> faiss.Index | None:
        """The Faiss index of row ``b``, head ``h`` (None for the torch backend)."""
        return None if self._indexes is None else self._indexes[b][h]

    def nbytes(self) -> int:
        """Bytes held: key/value storage (allocated capacity) + serialized size of every Faiss index."""
        total = self._storage.nbytes()
        if self._indexes is not None:
            total += sum(factory.index_nbytes(i) for row in self._indexes for i in row)
        return total

    def reset(self) -> None:
        """Drop all keys and indexes (untrained again); configuration is kept."""
        self._storage.reset()
        self._reset_indexes()

    def __repr__(self) -> str:
        return (f"KnnStore(B={self.batch_size}, H={self.num_heads}, d={self.head_dim}, index={self.index!r}, "
                f"backend={self.backend!r}, faiss_metric={self.faiss_metric!r}, faiss_search={self.faiss_search!r}, "
                f"dtype={self.dtype}, device={self.device}, sizes={self.sizes()})")

    # ---------------------------------------------------------------- add
    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Append keys/values [B, H, T, d]; tokens with mask[b, t] False are skipped."""
        B, H, d = self.batch_size, self.num_heads, self.head_dim
        checks.float_tensor("keys", keys, 4)
        checks.shape("keys", keys, {0: ("batch", B), 1: ("heads", H), 3: ("head_dim", d)})
        checks.float_tensor("values", values, 4)
        if values.shape != keys.shape:
            raise ValueError(f"values has shape {tuple(values.shape)}, expected keys' shape {tuple(keys.shape)}")
        mask = checks.mask(mask, B, keys.shape[2], self.device)
        checks.finite("keys", keys)
        keys = keys.detach().to(self.device, self.dtype)
        values = values.detach().to(self.device, self.dtype)
        st = self._storage
        if mask is None and len(set(st.sizes)) == 1:
            st.append_all(keys, values)
        else:
            for b in range(B):
                sel = slice(None) if mask is None else mask[b]
                st.append_row(b, keys[b][:, sel], values[b][:, sel])
        if self.backend == "faiss":
            for b in range(B):
                self._sync_row(b)

    def _sync_row(self, b: int) -> None:
        """Bring row ``b``'s indexes up to date, training them once enough keys arrived."""
        n, done = self._storage.sizes[b], self._indexed[b]
        if n == done:
            return
        if not self._trained[b]:
            if n < self.train_size:
                return
            self._train_row(b)
        x = self._storage.float_keys(b, done, n)
        for h, idx in enumerate(self._indexes[b]):
            factory.add_sequential(idx, self._indexable(b, h, x[h]), done)
        self._indexed[b] = n

    def _indexable(self, b: int, h: int, x: np.ndarray) -> np.ndarray:
        """Keys [n, d] as the index of (row b, head h) takes them: as they are ("ip") or norm-augmented ("l2",
        fixing the row's augmentation norm from the first keys it sees)."""
        if self.faiss_metric == "ip":
            return x
        if self._norms[b, h] == 0:
            self._norms[b, h] = factory.augmentation_norm(x)
        return factory.augment_keys(x, self._norms[b, h])

    def _train_row(self, b: int) -> None:
        n = self._storage.sizes[b]
        x = self._storage.float_keys(b, 0, n)
        if n > self.train_size:  # seeded sample of train_size buffered keys
            pick = np.sort(np.random.default_rng(self.seed).choice(n, self.train_size, replace=False))
            x = x[:, pick]
        try:
            for h, idx in enumerate(self._indexes[b]):
                idx.train(np.ascontiguousarray(self._indexable(b, h, x[h])))
        except RuntimeError as e:  # the row stays buffered (searched exactly); no key is lost
            raise ValueError(f"train_size={self.train_size}: Faiss could not train index={self.index!r}: {e}") from None
        self._trained[b] = True

    # ---------------------------------------------------------------- search
    def search(self, queries: torch.Tensor, k: int, heads: slice | None = None) -> SearchResult:
        """Top-k stored keys by inner product for queries [B, h, Q, d].

        ``heads`` selects the storage heads searched (default: all, h = H), e.g.
        slice(h0, h1) for a block of KV heads. K = min(k, largest row size): a
        k above the memory size returns the whole memory; rows with fewer than
        K keys (or approximate searches that find fewer) are padded with ids -1,
        scores -inf and zero values.
        """
        B, d = self.batch_size, self.head_dim
        hsel, hs = self._head_selection(heads)
        checks.float_tensor("queries", queries, 4)
        checks.shape("queries", queries, {0: ("batch", B), 1: ("heads", len(hs)), 3: ("head_dim", d)})
        k = checks.k_value(k)
        checks.finite("queries", queries)
        Q, K = queries.shape[2], min(k, len(self))
        if K == 0 or Q == 0:
            return empty_result(B, len(hs), Q, d, self.dtype, self.device)
        q = queries.detach().to(self.device, torch.float32).contiguous()
        if self.backend == "torch":
            ids = self._exact_ids(q, list(range(B)), hsel, K)
        else:
            ids = self._faiss_ids(q, hsel, hs, min(K * self.k_factor, len(self)))
        return rescore(q, ids, self._storage.keys, self._storage.values, hs, K)

    def _head_selection(self, heads) -> tuple[slice | list[int], list[int]]:
        """(index usable on the heads dim, list of head numbers) for ``heads``: None, a slice or ints."""
        H = self.num_heads
        if heads is None:
            return slice(None), list(range(H))
        if isinstance(heads, slice):
            hs = list(range(H)[heads])
        else:
            hs = [int(h) for h in heads]
            if any(h < 0 or h >= H for h in hs):
                raise ValueError(f"heads={heads!r}: head numbers must lie in [0, {H})")
        if not hs:
            raise ValueError(f"heads={heads!r} selects no head of {H}")
        contiguous = hs == list(range(hs[0], hs[-1] + 1))
        return (slice(hs[0], hs[-1] + 1) if contiguous else hs), hs

    def _exact_ids(self, q: torch.Tensor, rows: list[int], hsel, K: int) -> torch.Tensor:
        """Exact top-K over the stored keys of ``rows`` and heads ``hsel`` (torch, batched)."""
        st = self._storage
        n = max(st.sizes[b] for b in rows)
        keys = st.keys[:, hsel, :n]  # a view when hsel is a slice
        if len(rows) < self.batch_size:
            keys, q = keys[rows], q[rows]
        return exact_topk(q, keys, [st.sizes[b] for b in rows], K)

    def _faiss_ids(self, q: torch.Tensor, hsel, hs: list[int], K: int) -> torch.Tensor:
        """One Faiss search per (row, head) with all Q queries; buffered rows searched exactly."""
        B, Q = self.batch_size, q.shape[2]
        ids = np.full((B, len(hs), Q, K), -1, dtype=np.int64)
        indexed = [b for b in range(B) if self._trained[b] and self._indexed[b] > 0]
        if indexed:
            qn = q.cpu().numpy()
            if self.faiss_metric == "l2":
                qn = factory.augment_queries(qn)
            dist = np.empty((Q, K), dtype=np.float32)
            for b in indexed:
                for j, h in enumerate(hs):
                    if self.faiss_search == "big_batch":
                        ids[b, j] = factory.big_batch_search(self._indexes[b][h], qn[b, j], K)[1]
                    else:
                        self._indexes[b][h].search(qn[b, j], K, D=dist, I=ids[b, j])
        out = torch.from_numpy(ids).to(q.device)
        buffered = [b for b in range(B) if not self._trained[b] and self._storage.sizes[b] > 0]
        if buffered:
            out[buffered] = self._exact_ids(q, buffered, hsel, K)
        return out
