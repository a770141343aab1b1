"""Faiss index creation, search parameters, training defaults and sizes.

Indices search by inner product, either directly (metric "ip") or as L2 over
norm-augmented vectors (metric "l2", see ``augment_keys``). Functions take and
return plain Faiss objects and numpy arrays; nothing here knows about torch.
"""

import contextlib
import io
import re

import faiss
import numpy as np

from .spec import METRICS as FAISS_METRICS
from .spec import SCANS as FAISS_SEARCHES
from .spec import check_index_string

EXAMPLES = ("Flat", "IVF256,Flat", "HNSW32", "IVF256,PQ16", "SQ8")
# The classes scan="big_batch" (faiss.contrib.big_batch_search) can search; see MemorySpec and check_search.
BIG_BATCH_CLASSES = (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)
# "l2": the augmentation norm is this factor times the largest key norm the index is first built from, so that
# later keys of a document rarely exceed it.
NORM_MARGIN = 1.1

# Points per centroid used to size default training sets. Faiss warns below 39.
POINTS_PER_CENTROID = 40
# Keys a list that an IVF with Flat or SQ codes is trained on (a sample of the keys buffered until its training
# size, POINTS_PER_CENTROID a list): k-means costs in proportion, and more keys did not raise recall on the demo.
TRAIN_POINTS_PER_LIST = 16
# Default training-set size for trainable indices with no centroids to count
# (e.g. scalar quantizers, which only learn per-dimension ranges).
MIN_TRAIN_SIZE = 1024


def make_index(spec: str, d: int, metric: str = "ip") -> faiss.Index:
    """Create an empty index from a Faiss ``index_factory`` string: an inner-product index of dimension ``d``
    (``metric="ip"``), or an L2 index of dimension ``d + 1`` for norm-augmented keys (``metric="l2"``).

    Raises ValueError naming the ``index`` argument if Faiss rejects ``spec``.
    """
    if metric not in FAISS_METRICS:
        raise ValueError(f"metric={metric!r} is unknown; accepted values: {FAISS_METRICS}")
    check_index_string(spec)  # strings that would crash or hang Faiss never reach it
    try:
        if metric == "l2":
            return faiss.index_factory(d + 1, spec, faiss.METRIC_L2)
        return faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"index={spec!r} was rejected by faiss.index_factory for d={d}: {e}. "
                         f"Accepted examples: {', '.join(repr(x) for x in EXAMPLES)} "
                         "(or 'exact' for exact search in torch)") from None


def augmentation_norm(x: np.ndarray) -> float:
    """The norm M for ``augment_keys``: NORM_MARGIN times the largest row norm of ``x`` [n, d]."""
    return NORM_MARGIN * float(np.sqrt((x.astype(np.float64) ** 2).sum(1).max()))


def augment_keys(x: np.ndarray, norm: float) -> np.ndarray:
    """Keys [n, d] -> [n, d + 1] with last column sqrt(M^2 - |k|^2), M = ``norm``.

    Every augmented key then has norm M, so for a query augmented with 0
    (``augment_queries``), |q - k|^2 = |q|^2 + M^2 - 2 <q, k>: the L2 nearest
    neighbours are the inner-product top-k, which graph (HNSW) and IVF indices
    find with a far higher recall than an inner-product index, whose "distance"
    is no metric (Bachrach et al. 2014). A key longer than M gets 0 there and
    ranks as if 2 <q, k> were lowered by |k|^2 - M^2.
    """
    sq = norm * norm - (x.astype(np.float64) ** 2).sum(1)
    return np.ascontiguousarray(np.hstack([x, np.sqrt(np.maximum(sq, 0.0))[:, None]]), dtype=np.float32)


def augment_queries(q: np.ndarray) -> np.ndarray:
    """Queries [..., d] -> [..., d + 1] with a zero last column (see ``augment_keys``)."""
    return np.ascontiguousarray(np.concatenate([q, np.zeros_like(q[..., :1])], axis=-1), dtype=np.float32)


def apply_params(index: faiss.Index, params: dict | None) -> None:
    """Set search parameters such as {"nprobe": 16} or {"efSearch": 64}.

    Uses faiss.ParameterSpace (GpuParameterSpace for GPU indices), which also
    reaches through pre-transforms and ID maps. Raises ValueError naming
    ``index_params`` for a parameter the index does not have.
    """
    if not params:
        return
    space = _parameter_space(index)
    for name, value in params.items():
        try:
            space.set_index_parameter(index, str(name), float(value))
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"index_params: cannot set {name}={value!r}: {type(faiss.downcast_index(index)).__name__} "
                             f"has no parameter {name!r}") from None


def _parameter_space(index: faiss.Index):
    if hasattr(faiss, "GpuParameterSpace") and "Gpu" in type(faiss.downcast_index(index)).__name__:
        return faiss.GpuParameterSpace()
    return faiss.ParameterSpace()


def _parts(index: faiss.Index):
    """Yield the index and the sub-indices it wraps (pre-transform, ID map, HNSW storage, refine)."""
    index = faiss.downcast_index(index)
    yield index
    for attr in ("index", "storage", "base_index", "refine_index"):
        inner = getattr(index, attr, None)
        if isinstance(inner, faiss.Index):
            yield from _parts(inner)


def _codebooks(index: faiss.Index):
    """Yield the number of centroids of every codebook that training learns (IVF, PQ, OPQ)."""
    for part in _parts(index):
        if hasattr(part, "nlist"):
            yield part.nlist
        pq = getattr(part, "pq", None)
        if pq is not None:
            yield pq.ksub
        if isinstance(part, faiss.IndexPreTransform):
            for i in range(part.chain.size()):
                if isinstance(faiss.downcast_VectorTransform(part.chain.at(i)), faiss.OPQMatrix):
                    yield 256  # OPQ trains its own 8-bit PQ


def default_train_size(index: faiss.Index) -> int:
    """Keys to buffer before training: 40 points per centroid of the largest codebook.

    max(1024, 40 * nlist for IVF, 40 * 2**nbits for PQ/OPQ codebooks), e.g.
    40960 for IVF1024, 10240 for 8-bit PQ, 1024 for SQ8 (which only learns
    value ranges). Indices that need no training (Flat, HNSW): 0.
    """
    if index.is_trained:
        return 0
    return max([MIN_TRAIN_SIZE] + [POINTS_PER_CENTROID * c for c in _codebooks(index)])


# train="grow": the smallest IVF trained early, and the factor between one stage's nlist and the next.
MIN_GROW_NLIST, GROW_FACTOR = 16, 4
GROWABLE = re.compile(r"IVF(\d+),(Flat|SQ\w+)")


def growth_stages(index: str, train_size: int) -> list[tuple[int, str]]:
    """train="grow": (keys at which a row's indexes are rebuilt, factory string) per stage, ascending; the last stage
    is ``index`` itself at ``train_size``. Earlier stages are IVF indexes of nlist / 4, nlist / 16, ... (at least
    MIN_GROW_NLIST lists), each trained at POINTS_PER_CENTROID keys per list."""
    match = GROWABLE.fullmatch(index)
    if match is None:
        raise ValueError(f"train='grow' grows IVF indexes with Flat or SQ codes ('IVF1024,Flat', 'IVF4096,SQ8'), "
                         f"got index={index!r}; use train='once'")
    nlist, codes = int(match.group(1)), match.group(2)
    stages, smaller = [], nlist // GROW_FACTOR
    while smaller >= MIN_GROW_NLIST and POINTS_PER_CENTROID * smaller < train_size:
        stages.append((POINTS_PER_CENTROID * smaller, f"IVF{smaller},{codes}"))
        smaller //= GROW_FACTOR
    return sorted(stages) + [(train_size, index)]


def training_sample_size(index: faiss.Index, at: int) -> int:
    """Keys to train ``index`` on when ``at`` keys are there: TRAIN_POINTS_PER_LIST a list (at least
    MIN_TRAIN_SIZE) for an IVF index with Flat or SQ codes, whose coarse k-means is all it learns; ``at`` for the
    others (PQ and OPQ codebooks learn from every key)."""
    index = faiss.downcast_index(index)
    if not isinstance(index, (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer)):
        return at
    return min(at, max(MIN_TRAIN_SIZE, TRAIN_POINTS_PER_LIST * index.nlist))


def min_train_size(index: faiss.Index) -> int:
    """Fewest keys Faiss accepts for training: one per centroid of the largest codebook."""
    return max([1] + list(_codebooks(index)))


def prepare_training(index: faiss.Index, seed: int) -> None:
    """Seed every k-means reachable from ``index`` (IVF coarse, PQ codebooks).

    Also turns off polysemous training of IVF-PQ (a slow annealing the factory
    enables by default), which only serves the Hamming pre-filter ("ht"
    parameter) that this store does not use.
    """
    for part in _parts(index):
        if getattr(part, "do_polysemous_training", False):
            part.do_polysemous_training = False
        cp = getattr(part, "cp", None)
        if cp is not None:
            cp.seed = seed
            if hasattr(part, "nlist"):  # only a warning threshold: Faiss prints one below it
                cp.min_points_per_centroid = min(cp.min_points_per_centroid, TRAIN_POINTS_PER_LIST)
        pq = getattr(part, "pq", None)
        if pq is not None and getattr(pq, "cp", None) is not None:
            pq.cp.seed = seed


def uses_ids(index: faiss.Index) -> bool:
    """True for ID-map indices, which need add_with_ids."""
    return isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2))


def add_sequential(index: faiss.Index, x: np.ndarray, start: int) -> None:
    """Add rows of ``x`` so that their ids are ``start, start + 1, ...``."""
    if uses_ids(index):
        index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
    else:
        assert index.ntotal == start, "index and storage out of sync"
        index.add(x)


def index_nbytes(index: faiss.Index) -> int:
    """Bytes held by ``index``, measured as its serialized size."""
    if "Gpu" in type(faiss.downcast_index(index)).__name__:
        index = faiss.index_gpu_to_cpu(index)
    return int(faiss.serialize_index(index).nbytes)


def gpu_available() -> bool:
    """Whether this Faiss build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_gpu(index: faiss.Index, resources, device_id: int) -> faiss.Index:
    """Move ``index`` to GPU ``device_id``; return it unchanged if Faiss has no GPU version."""
    try:
        return faiss.index_cpu_to_gpu(resources, device_id, index)
    except RuntimeError:
        return index  # e.g. HNSW has no GPU implementation: stay on CPU


def check_search(scan: str, index: faiss.Index) -> None:
    """Raise ValueError naming ``scan`` unless ``scan`` is one of FAISS_SEARCHES and can search ``index``."""
    if scan not in FAISS_SEARCHES:
        raise ValueError(f"scan={scan!r} is unknown; accepted values: {FAISS_SEARCHES}")
    if scan == "big_batch" and type(index) not in BIG_BATCH_CLASSES:
        raise ValueError(f"scan='big_batch' needs an IVF index with Flat, PQ or SQ codes "
                         f"({', '.join(c.__name__ for c in BIG_BATCH_CLASSES)}), got {type(index).__name__}; "
                         "use scan='index'")
    if scan == "big_batch" and index.by_residual and index.metric_type == faiss.METRIC_INNER_PRODUCT:
        # big_batch_search scores a residual-encoded list by <q - centroid, residual>, not <q, centroid + residual>
        raise ValueError(f"scan='big_batch' scores residual-encoded lists ({type(index).__name__}) right "
                         "only with the L2 metric: use metric=l2 or scan=index")


def big_batch_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids) [nq, k] of ``index.search(queries, k)``, computed list by list with
    ``faiss.contrib.big_batch_search`` (pairwise distances of all queries probing a list at once); ids -1 where
    fewer than k were found. Few queries (nq * nprobe <= nlist, where Faiss's bucket sort refuses them and list by
    list gains nothing) take ``index.search``."""
    from faiss.contrib.big_batch_search import big_batch_search as search

    if len(queries) * index.nprobe <= index.nlist:
        return index.search(queries, k)
    with contextlib.redirect_stdout(io.StringIO()):  # verbose=1 still prints phase times (0: a line per list)
        return search(index, queries, k, method="pairwise_distances", verbose=1)
