"""KnnStore: the kNN memory of one attention layer, one index per (row, head)."""

import faiss
import numpy as np
import torch

from . import checks, factory
from .coarse import Coarse, preassignable
from .exact import exact_topk
from .result import SearchResult, empty_result, rescore
from .spec import MemorySpec
from .storage import RowStorage

ADD_CHUNK = 1 << 14  # keys per (row, head) cast to float32 and added to an index at once


class KnnStore:
    """Keys/values of a batch of sequences, searchable by inner product.

    Each batch row ``b`` and head ``h`` has its own index; rows grow
    independently (padding is never stored). Ids are positions in the row's
    storage. Search returns candidates from the index (exact for "Flat" and
    "exact", approximate for IVF/HNSW/PQ/SQ), re-scored exactly in float32
    from the stored keys and sorted by that score.

    ``spec`` (a ``MemorySpec``, its text form or dict) says how: the index
    ("exact" for exact top-k in torch, or a Faiss ``index_factory`` string),
    the default k, ``k_factor`` (fetch ``k_factor * k`` candidates and keep
    the k best by exact score, as faiss.IndexRefine), ``metric`` ("l2" indexes
    keys augmented to a common norm M, ``factory.augment_keys``; M per
    (row, head) is 1.1 x the largest norm of the row's keys when its index is built),
    ``scan`` ("big_batch": faiss.contrib.big_batch_search, IVF on the CPU)
    and the Faiss search parameters (nprobe, efSearch, ...).

    Trainable indices (IVF, PQ, SQ...) start untrained: a row's keys are
    searched exactly until ``train_size`` of them have arrived, then each of the
    row's head indices is trained once (seeded) and receives the whole buffer,
    so no key is lost. With ``train="grow"`` (IVF with Flat or SQ codes) a row
    gets IVF indexes of nlist/64, nlist/16, nlist/4 lists early (at 40 keys per
    list) and is rebuilt at each stage, so the exact phase ends at 640 keys;
    from ``train_size`` on it holds exactly what ``train="once"`` builds.
    ``train_size`` defaults to ``factory.default_train_size``: max(1024,
    40 x nlist for IVF, 40 x 256 for 8-bit PQ), e.g. 40960 for IVF1024.

    The index receives the stored keys (after rounding to ``dtype``), cast to
    float32, so exact indices rank keys exactly as the returned scores do.

    ``storage="disk"`` in the spec keeps keys and values in files under
    ``directory`` (``knn_index.disk.DiskStorage``; None: a temporary directory
    removed by ``close()``), read back only for the candidates of a search; a
    directory that already holds a store is opened (``verify``: check every
    byte's CRC) and its indexes are rebuilt from the files at the first add or
    search, unless ``load_state_dict`` installs saved ones.
    """

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, spec: MemorySpec | str | dict = "Flat", *,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int = 0,
                 train_size: int | None = None, directory=None, verify: bool = True):
        self.batch_size = checks.positive_int("batch_size", batch_size)
        self.num_heads = checks.positive_int("num_heads", num_heads)
        self.head_dim = checks.positive_int("head_dim", head_dim)
        self.spec = spec = MemorySpec.coerce(spec)
        if spec.kind == "dense":
            raise ValueError("spec: a KnnStore searches; 'dense' memory (attend to every entry) is not a kNN index")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.dtype, self.device, self.seed = dtype, torch.device(device), int(seed)
        self.exact = spec.kind == "exact"
        self._proto = None if self.exact else factory.make_index(spec.index, self.head_dim, spec.metric)
        if self._proto is not None:
            factory.apply_params(self._proto, spec.index_params)  # validates the names against this index
            factory.check_search(spec.scan, self._proto)
            if spec.scan == "big_batch" and self.device.type != "cpu":
                raise ValueError(f"scan='big_batch' scans Faiss indexes on the CPU; got device={str(self.device)!r}")
            factory.prepare_training(self._proto, self.seed)
        self.train_size = self._check_train_size(train_size)
        # (keys at which a row's indexes are (re)built and trained, prototype); one stage unless train="grow"
        self._stages = [(self.train_size, self._proto)] if self._proto is not None else []
        if spec.train == "grow" and self._proto is not None:
            self._stages = [(at, self._stage_proto(index)) for at, index in
                            factory.growth_stages(spec.index, self.train_size)[:-1]] + self._stages
        self._gpu = None
        if not self.exact and self.device.type == "cuda" and factory.gpu_available():
            self._gpu = faiss.StandardGpuResources()
        if spec.storage == "disk":
            from .disk import DiskStorage

            self._storage = DiskStorage(directory, self.batch_size, self.num_heads, self.head_dim, dtype, self.device,
                                        spec.ram_budget, verify=verify)
        elif directory is not None:
            raise ValueError(f"directory={directory!r} is for storage=disk; spec '{spec}' keeps keys in RAM")
        else:
            self._storage = RowStorage(self.batch_size, self.num_heads, self.head_dim, dtype, self.device)
        self._reset_indexes()
        self._unindexed = any(self._storage.sizes)  # an opened store directory: indexes built on first use

    def _check_train_size(self, train_size) -> int:
        if self.exact or self._proto.is_trained:
            return 0
        if train_size is None:
            return factory.default_train_size(self._proto)
        train_size = checks.positive_int("train_size", train_size)
        need = factory.min_train_size(self._proto)
        if train_size < need:
            raise ValueError(f"train_size={train_size} is below the {need} keys index={self.spec.index!r} needs to train")
        return train_size

    def _stage_proto(self, index: str) -> faiss.Index:
        proto = factory.make_index(index, self.head_dim, self.spec.metric)
        factory.prepare_training(proto, self.seed)
        return proto

    def _new_index(self, proto: faiss.Index) -> faiss.Index:
        idx = faiss.clone_index(proto)
        if self._gpu is not None:
            idx = factory.to_gpu(idx, self._gpu, self.device.index or 0)
        factory.apply_params(idx, self.spec.index_params)
        return idx

    def _reset_indexes(self) -> None:
        B, H = self.batch_size, self.num_heads
        faiss_path = not self.exact
        self._indexes = [[self._new_index(self._proto) for _ in range(H)] for _ in range(B)] if faiss_path else None
        # the stage whose indexes serve a row's keys; -1: buffered, searched exactly until the first stage
        self._stage = [0 if faiss_path and self.train_size == 0 else -1] * B
        self._indexed = [0] * B  # keys of the row already added to its indexes
        self._norms = np.zeros((B, H))  # faiss_metric "l2": augmentation norm per (row, head), 0 = not set yet
        self._coarse = [None] * B  # per row: (the index list it describes, its Coarse or None); see _row_coarse

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
        return [stage >= 0 for stage in self._stage]

    def faiss_index(self, b: int, h: int) -> faiss.Index | None:
        """The Faiss index of row ``b``, head ``h`` (None for the torch backend)."""
        return None if self._indexes is None else self._indexes[b][h]

    @property
    def directory(self) -> str | None:
        """The folder of a disk store's files (None in RAM)."""
        return getattr(self._storage, "directory", None)

    def nbytes(self) -> int:
        """Bytes held in RAM: key/value storage (allocated capacity; 0 on disk) + serialized size of every Faiss
        index."""
        total = self._storage.nbytes()
        if self._indexes is not None:
            total += sum(factory.index_nbytes(i) for row in self._indexes for i in row)
        return total

    def disk_nbytes(self) -> int:
        """Bytes of a disk store's files (0 in RAM)."""
        return self._storage.disk_nbytes()

    def reserve(self, tokens: int) -> None:
        """Prepare every row to hold ``tokens`` tokens: RAM storage allocates exactly that capacity now (no growth
        up to there, so no old and new buffer held together); disk storage checks the free space for them (OSError
        if the disk is too small)."""
        self._storage.reserve(checks.positive_int("tokens", tokens))

    def flush(self) -> None:
        """Make a disk store's files durable (fsync); nothing in RAM."""
        self._storage.flush()

    def journal_sha256(self) -> str:
        """SHA-256 of a disk store's journal, which records the CRC-32 of every appended byte."""
        if self.directory is None:
            raise ValueError("journal_sha256: this store keeps its keys in RAM (storage=ram)")
        return self._storage.journal_sha256()

    def close(self) -> None:
        """Flush and close a disk store's files (a temporary directory is removed); nothing in RAM."""
        self._storage.close()

    def reset(self) -> None:
        """Drop all keys and indexes (untrained again); configuration is kept."""
        self._storage.reset()
        self._reset_indexes()
        self._unindexed = False

    def entries(self, heads: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every stored entry of ``heads``: keys and values [B, h, N, d] (views of RAM storage, read from the files
        of disk storage; N = ``len(self)``) and valid bool [B, N] (False past a shorter row's end)."""
        st, n = self._storage, len(self)
        valid = torch.arange(n, device=self.device)[None, :] < torch.tensor(st.sizes, device=self.device)[:, None]
        return *st.entries(heads, n), valid

    def __repr__(self) -> str:
        return (f"KnnStore(B={self.batch_size}, H={self.num_heads}, d={self.head_dim}, spec='{self.spec}', "
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
        self._ensure_indexed()
        if mask is None and len(set(st.sizes)) == 1:
            st.append_all(keys, values)
        else:
            rows = [slice(None) if mask is None else mask[b] for b in range(B)]
            st.append_rows([(keys[b][:, sel], values[b][:, sel]) for b, sel in enumerate(rows)])
        if not self.exact:
            for b in range(B):
                self._sync_row(b)

    def _sync_row(self, b: int) -> None:
        """Bring row ``b``'s indexes up to date, training them once enough keys arrived."""
        n, done = self._storage.sizes[b], self._indexed[b]
        if n == done:
            return
        stage = max([s for s, (at, _) in enumerate(self._stages) if at <= n], default=-1)
        if stage < 0:
            return
        if stage != self._stage[b]:
            self._build_row(b, stage)
            done = 0
        coarse = self._row_coarse(b)
        if self.spec.metric == "l2" and not self._norms[b].all() and n - done > ADD_CHUNK:
            # the norms come from every key of this first add, as if it were added at once
            largest = np.zeros(self.num_heads)
            for start in range(done, n, ADD_CHUNK):
                x = self._storage.float_keys(b, start, min(n, start + ADD_CHUNK))
                largest = np.maximum(largest, [factory.augmentation_norm(x[h]) for h in range(self.num_heads)])
            self._norms[b] = np.where(self._norms[b] == 0, largest, self._norms[b])
        for start in range(done, n, ADD_CHUNK):
            x = self._storage.float_keys(b, start, min(n, start + ADD_CHUNK))
            if coarse is None:
                for h, idx in enumerate(self._indexes[b]):
                    factory.add_sequential(idx, self._indexable(b, h, x[h]), start)
            else:  # every head's keys assigned to lists at once, then appended with ids start, start + 1, ...
                x = np.stack([self._indexable(b, h, x[h]) for h in range(self.num_heads)])
                lists = coarse.nearest(torch.from_numpy(x), list(range(self.num_heads)))
                for h, idx in enumerate(self._indexes[b]):
                    assert idx.ntotal == start, "index and storage out of sync"
                    coarse.add(h, x[h], lists[h])
        self._indexed[b] = n

    def _ensure_indexed(self) -> None:
        """Index the keys of an opened store directory (once, before its first add or search)."""
        if self._unindexed:
            self._unindexed = False
            if not self.exact:
                for b in range(self.batch_size):
                    self._sync_row(b)

    def _row_coarse(self, b: int) -> Coarse | None:
        """The torch coarse step of row ``b``'s trained IVF indexes (built when they change), or None where each
        index runs its own quantizer (GPU indexes, non-IVF indexes, rows not trained yet)."""
        row = self._indexes[b]
        cached = self._coarse[b]
        if cached is None or cached[0] is not row:
            usable = self._gpu is None and self._stage[b] >= 0 and all(preassignable(i) for i in row)
            cached = self._coarse[b] = (row, Coarse(row) if usable else None)
        return cached[1]

    def _indexable(self, b: int, h: int, x: np.ndarray) -> np.ndarray:
        """Keys [n, d] as the index of (row b, head h) takes them: as they are ("ip") or norm-augmented ("l2",
        fixing the row's augmentation norm from the first keys it sees)."""
        if self.spec.metric == "ip":
            return x
        if self._norms[b, h] == 0:
            self._norms[b, h] = factory.augmentation_norm(x)
        return factory.augment_keys(x, self._norms[b, h])

    def _build_row(self, b: int, stage: int) -> None:
        """New indexes of ``stage`` for row ``b``, trained on a seeded sample of the row's keys
        (``factory.training_sample_size``; the augmentation norm of metric "l2" taken afresh from every stored key);
        the caller adds every key."""
        at, proto = self._stages[stage]
        n = self._storage.sizes[b]
        x = self._storage.float_keys(b, 0, n)
        norms = self._norms[b].copy()
        self._norms[b] = 0
        if self.spec.metric == "l2":
            self._norms[b] = [factory.augmentation_norm(keys) for keys in x]
        sample = factory.training_sample_size(proto, at)
        if n > sample:  # seeded sample of the stored keys
            pick = np.sort(np.random.default_rng(self.seed).choice(n, sample, replace=False))
            x = x[:, pick]
        indexes = [self._new_index(proto) for _ in range(self.num_heads)]
        try:
            for h, idx in enumerate(indexes):
                if not idx.is_trained:
                    idx.train(np.ascontiguousarray(self._indexable(b, h, x[h])))
        except RuntimeError as e:  # the row keeps its indexes and their norms (or stays buffered); no key is lost
            self._norms[b] = norms
            raise ValueError(f"train_size={at}: Faiss could not train index={self.spec.index!r}: {e}") from None
        self._indexes[b], self._stage[b], self._indexed[b] = indexes, stage, 0

    # ---------------------------------------------------------------- search
    def search(self, queries: torch.Tensor, k: int | None = None, heads: slice | None = None) -> SearchResult:
        """Top-k stored keys by inner product for queries [B, h, Q, d] (k: the spec's by default).

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
        k = self.spec.k if k is None else checks.k_value(k)
        checks.finite("queries", queries)
        Q, K = queries.shape[2], min(k, len(self))
        self._ensure_indexed()
        if K == 0 or Q == 0:
            return empty_result(B, len(hs), Q, d, self.dtype, self.device)
        q = queries.detach().to(self.device, torch.float32).contiguous()
        if self.exact:
            ids = self._exact_ids(q, list(range(B)), hsel, K)
        else:
            ids = self._faiss_ids(q, hsel, hs, min(K * self.spec.k_factor, len(self)))
        return rescore(q, ids, self._storage, hs, K)

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
        keys = st.scan_keys(rows, hsel, n)
        if len(rows) < self.batch_size:
            q = q[rows]
        return exact_topk(q, keys, [st.sizes[b] for b in rows], K)

    def _faiss_ids(self, q: torch.Tensor, hsel, hs: list[int], K: int) -> torch.Tensor:
        """One Faiss search per (row, head) with all Q queries; buffered rows searched exactly."""
        B, Q = self.batch_size, q.shape[2]
        ids = np.full((B, len(hs), Q, K), -1, dtype=np.int64)
        indexed = [b for b in range(B) if self._stage[b] >= 0 and self._indexed[b] > 0]
        if indexed:
            qn = q.cpu().numpy()
            if self.spec.metric == "l2":
                qn = factory.augment_queries(qn)
            dist = np.empty((Q, K), dtype=np.float32)
            for b in indexed:
                coarse = self._row_coarse(b) if self.spec.scan == "index" else None
                if coarse is not None:  # the coarse step of every head at once, then each head scans its lists
                    nprobe = faiss.downcast_index(self._indexes[b][hs[0]]).nprobe
                    near, lists = coarse.assign(torch.from_numpy(qn[b]), hs, nprobe)
                    for j, h in enumerate(hs):
                        coarse.search(h, qn[b, j], K, lists[j], near[j], dist, ids[b, j])
                    continue
                for j, h in enumerate(hs):
                    if self.spec.scan == "big_batch":
                        ids[b, j] = factory.big_batch_search(self._indexes[b][h], qn[b, j], K)[1]
                    else:
                        self._indexes[b][h].search(qn[b, j], K, D=dist, I=ids[b, j])
        out = torch.from_numpy(ids).to(q.device)
        buffered = [b for b in range(B) if self._stage[b] < 0 and self._storage.sizes[b] > 0]
        if buffered:
            out[buffered] = self._exact_ids(q, buffered, hsel, K)
        return out

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild this store with ``load_state_dict``: keys, values, row sizes and, for
        Faiss, the indexes as ``faiss.serialize_index`` bytes in uint8 tensors (GPU indexes copied to the CPU
        first). Nothing is pickled. A disk store's keys and values stay in its files: its state holds the row sizes
        and indexes only, and loads into a store opened on the same directory."""
        st = self._storage
        self._ensure_indexed()
        used = len(self)
        state = {"sizes": torch.tensor(st.sizes, dtype=torch.int64)}
        if self.directory is None:
            state["keys"] = st.keys[:, :, :used].contiguous()  # zeros past a shorter row's end (RowStorage)
            state["values"] = st.values[:, :, :used].contiguous()
        if self.exact:
            return state
        state["stage"] = torch.tensor(self._stage, dtype=torch.int64)
        state["indexed"] = torch.tensor(self._indexed, dtype=torch.int64)
        if self.spec.metric != "ip":  # the norm that later keys are augmented to
            state["augmentation_norms"] = torch.from_numpy(self._norms.copy())
        for b, row in enumerate(self._indexes):
            for h, index in enumerate(row):
                if self._gpu is not None:
                    index = faiss.index_gpu_to_cpu(index)
                state[f"index.{b}.{h}"] = torch.from_numpy(faiss.serialize_index(index).copy())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace this store's contents with ``state_dict`` output of a store with the same spec and shape.

        Every tensor and every Faiss index is checked against this store before anything changes (names, shapes,
        dtypes, row sizes; index type, dimension, metric, training and size); a mismatch raises ValueError.
        A disk store takes a state with keys and values (they are written to its files) or without them, when its
        directory already holds exactly those row sizes (a saved disk store, opened).
        """
        B, H, d = self.batch_size, self.num_heads, self.head_dim
        on_disk = self.directory is not None and "keys" not in state and "values" not in state
        expected = {"sizes"} if on_disk else {"sizes", "keys", "values"}
        if not self.exact:
            expected |= {"stage", "indexed"} | {f"index.{b}.{h}" for b in range(B) for h in range(H)}
            if self.spec.metric != "ip":
                expected.add("augmentation_norms")
        if set(state) != expected:
            raise ValueError(f"state does not fit a store with spec '{self.spec}': missing "
                             f"{sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}")
        sizes = _int_list(state, "sizes", B)
        n = max(sizes)
        if on_disk and sizes != self._storage.sizes:
            raise ValueError(f"state['sizes'] is {sizes}, but the files in {self.directory!r} hold {self._storage.sizes} "
                             "tokens per row")
        for name in ("keys", "values") if not on_disk else ():
            t = state[name]
            if not t.is_floating_point() or tuple(t.shape) != (B, H, n, d):
                raise ValueError(f"state[{name!r}] has shape {tuple(t.shape)} ({t.dtype}); this store needs a "
                                 f"floating tensor of shape {(B, H, n, d)}")
        if min(sizes) < 0:
            raise ValueError(f"state['sizes'] holds negative sizes: {sizes}")
        for b, size in enumerate(sizes if not on_disk else ()):
            checks.finite("state['keys']", state["keys"][b, :, :size])
        indexes = None
        if not self.exact:
            stages, indexed = _int_list(state, "stage", B), _int_list(state, "indexed", B)
            if any(not -1 <= s < len(self._stages) or (self.train_size == 0 and s != 0) for s in stages):
                raise ValueError(f"state['stage'] holds {stages}; this store's spec '{self.spec}' has stages "
                                 f"-1 (buffered) to {len(self._stages) - 1}")
            norms = None
            if "augmentation_norms" in state:
                norms = state["augmentation_norms"]
                if tuple(norms.shape) != (B, H) or not norms.is_floating_point() or not bool((norms >= 0).all()):
                    raise ValueError("state['augmentation_norms'] must be non-negative floats of shape "
                                     f"{(B, H)}, got {tuple(norms.shape)}")
                norms = norms.double().numpy().copy()
            indexes = [[self._load_index(state[f"index.{b}.{h}"], f"index.{b}.{h}", stages[b], indexed[b], sizes[b])
                        for h in range(H)] for b in range(B)]
        st = self._storage
        if on_disk:
            self._reset_indexes()
        else:
            self.reset()
            st.append_rows([(state["keys"][b, :, :size].to(st.device, st.dtype),
                             state["values"][b, :, :size].to(st.device, st.dtype)) for b, size in enumerate(sizes)])
        self._unindexed = False
        if indexes is not None:
            self._indexes, self._stage, self._indexed = indexes, stages, indexed
            if norms is not None:
                self._norms = norms

    def _load_index(self, data: torch.Tensor, name: str, stage: int, indexed: int, size: int) -> faiss.Index:
        """Deserialize one head's index and check it against this store's prototype and the row's bookkeeping."""
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ValueError(f"state[{name!r}] must be uint8 bytes of faiss.serialize_index, got {data.dtype} "
                             f"of shape {tuple(data.shape)}")
        try:
            index = faiss.deserialize_index(np.ascontiguousarray(data.numpy()))
        except RuntimeError as e:
            raise ValueError(f"state[{name!r}] is not a readable Faiss index: {str(e).splitlines()[0]}") from None
        trained = stage >= 0
        proto = self._stages[max(stage, 0)][1] if self._stages else self._proto
        # the class a serialized prototype reads back as (faiss.index_factory may return a base class)
        want = (type(faiss.deserialize_index(faiss.serialize_index(proto))).__name__, proto.d, proto.metric_type)
        got = (type(index).__name__, index.d, index.metric_type)
        if got != want:
            raise ValueError(f"state[{name!r}] is a {got[0]} of dimension {got[1]} and metric {got[2]}; this "
                             f"store's spec '{self.spec}' makes a {want[0]} of dimension {want[1]} and metric {want[2]}")
        if getattr(index, "nlist", None) != getattr(proto, "nlist", None):
            raise ValueError(f"state[{name!r}] has nlist {index.nlist}, the spec '{self.spec}' {proto.nlist} at "
                             f"stage {stage}")
        if index.is_trained != (trained or proto.is_trained) or not 0 <= indexed <= size or \
                index.ntotal != (indexed if trained else 0) or (not trained and indexed != 0):
            raise ValueError(f"state[{name!r}] holds {index.ntotal} keys (trained: {index.is_trained}) but the row "
                             f"records {indexed} indexed of {size} stored (trained: {trained})")
        if self._gpu is not None:
            index = factory.to_gpu(index, self._gpu, self.device.index or 0)
        factory.apply_params(index, self.spec.index_params)
        return index


def _int_list(state: dict, name: str, length: int) -> list[int]:
    t = state[name]
    if t.dtype != torch.int64 or tuple(t.shape) != (length,):
        raise ValueError(f"state[{name!r}] must be int64 of shape ({length},), got {t.dtype} {tuple(t.shape)}")
    return t.tolist()
