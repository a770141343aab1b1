"""MemorySpec: how a memory stores and searches its entries, one value validated once.

    MemorySpec.parse("IVF1024,Flat k=32 nprobe=32 metric=l2")
    MemorySpec(index="HNSW32", k=16, index_params={"efSearch": 64})
    MemorySpec.coerce("exact k=8")        # str, dict or MemorySpec -> MemorySpec

The text form is the index (``dense``, ``exact`` or a Faiss ``index_factory`` string, no spaces) followed by
``name=value`` options: ``k``, ``k_factor``, ``metric`` (ip, l2), ``scan`` (index, big_batch), ``train`` (once,
grow), ``storage`` (ram, disk), ``ram_budget`` (MiB, disk storage), ``block``, ``token_k`` and the Faiss
parameters in ``SEARCH_PARAMS``. ``str(spec)`` gives it back. Everything that can be checked without knowing the
vector dimension is checked here, including the factory strings that make Faiss abort, crash or hang; what depends
on the dimension (``PQ16`` needs d divisible by 16) is checked when a store builds its index.
This module imports neither torch nor Faiss.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field

DENSE, EXACT = "dense", "exact"
EXACT_ALIASES = ("torch", "torch_topk")  # earlier spellings of exact search
METRICS = ("ip", "l2")
SCANS = ("index", "big_batch")
TRAINS = ("once", "grow")
STORAGES = ("ram", "disk")
DEFAULT_RAM_BUDGET = 256  # MiB of mapped key/value file pages a disk store lets stay resident (see MemorySpec)
MAX_RAM_BUDGET = 1 << 24
# Faiss index parameters a spec may set (faiss.ParameterSpace names) and their largest accepted value.
SEARCH_PARAMS = {"nprobe": 1 << 20, "efSearch": 1 << 20, "efConstruction": 1 << 16, "quantizer_efSearch": 1 << 20,
                 "max_codes": 1 << 40}
MAX_K = 1 << 24
MAX_BLOCK = 1 << 16
MAX_K_FACTOR = 1 << 10


@dataclass(frozen=True)
class MemorySpec:
    """How one memory layer stores and searches its (key, value) entries.

    index:    "dense" (attend to every entry, the official behaviour), "exact" (exact top-k in torch) or a Faiss
              ``index_factory`` string ("Flat", "IVF1024,Flat", "HNSW32", "IVF1024,PQ16", "SQ8", ...).
    k:        entries retrieved per query and KV head (kNN indices).
    k_factor: fetch ``k_factor * k`` candidates from the index, keep the k best by exact score (as IndexRefine).
    metric:   "ip" (inner-product index) or "l2" (norm-augmented keys in an L2 index; higher recall for IVF/HNSW).
    scan:     "index" (the index's own search) or "big_batch" (IVF lists scanned once for all queries of a window).
    train:    "once" (search a trainable index's keys exactly until it trains, once) or "grow" (IVF with Flat or SQ
              codes: train a smaller IVF early and again at every 4x more keys, up to the spec's nlist).
    storage:  "ram" (keys and values in tensors) or "disk" (in files appended window by window, read back only
              for the candidates of a search; see ``knn_index.disk``). Searching needs the index itself in RAM: with
              "disk" use compressed codes ("IVF1024,PQ16", "IVF1024,SQ8") to bound RAM; "Flat"/"IVF,Flat" hold
              every key in float32.
    ram_budget: storage "disk": MiB of file pages that reading candidates may map at once before they are
              dropped again (MADV_DONTNEED); bounds the resident set, not the page cache.
    index_params: Faiss search parameters, e.g. {"nprobe": 32} or {"efSearch": 64}; positive integers.
    block:    tokens per retrieved unit. 1: the top-k tokens per query. b > 1: the memory is cut into blocks of b
              consecutive tokens, each searchable by one representative key (the mean of its keys); a lookup
              retrieves the k best blocks for the mean of its queries, and every query attends to all their tokens.
              The index then holds one representative per block (in RAM, float32); ``storage`` holds the tokens.
    token_k:  with block > 1: 0 (every query attends to all tokens of the retrieved blocks) or t >= 1 (each query
              attends to its t best-scoring tokens among them: per-query top-t over the retrieved blocks).
    """

    index: str = DENSE
    k: int = 32
    k_factor: int = 1
    metric: str = "ip"
    scan: str = "index"
    train: str = "once"
    storage: str = "ram"
    ram_budget: int = DEFAULT_RAM_BUDGET
    index_params: dict = field(default_factory=dict)
    block: int = 1
    token_k: int = 0

    def __post_init__(self):
        index = self.index.strip() if isinstance(self.index, str) else self.index
        if index in EXACT_ALIASES:
            index = EXACT
        check_index_string(index)
        set_ = object.__setattr__
        set_(self, "index", index)
        set_(self, "k", _int("k", self.k, MAX_K))
        set_(self, "k_factor", _int("k_factor", self.k_factor, MAX_K_FACTOR))
        _choice("metric", self.metric, METRICS)
        _choice("scan", self.scan, SCANS)
        _choice("train", self.train, TRAINS)
        _choice("storage", self.storage, STORAGES)
        set_(self, "ram_budget", _int("ram_budget", self.ram_budget, MAX_RAM_BUDGET))
        if self.storage == "ram" and self.ram_budget != DEFAULT_RAM_BUDGET:
            raise ValueError(f"ram_budget={self.ram_budget} sizes a disk memory; add storage=disk or drop it")
        if self.index == DENSE and self.storage != "ram":
            raise ValueError("memory 'dense' attends to every entry and keeps them in RAM; storage=disk needs a kNN "
                             "index such as 'IVF1024,PQ16' or 'exact'")
        set_(self, "index_params", _search_params(self.index_params))
        set_(self, "block", _int("block", self.block, MAX_BLOCK))
        if self.index == DENSE and self.block != 1:
            raise ValueError(f"memory 'dense' attends to every entry and retrieves no blocks; got block={self.block}")
        if isinstance(self.token_k, bool) or not isinstance(self.token_k, numbers.Integral) or \
                not 0 <= self.token_k <= MAX_K:
            raise ValueError(f"token_k must be 0 (all tokens of the retrieved blocks) or an int in [1, {MAX_K}], "
                             f"got {self.token_k!r}")
        set_(self, "token_k", int(self.token_k))
        if self.token_k != 0:
            if self.block == 1:
                raise ValueError(f"token_k={self.token_k} picks tokens among retrieved blocks; it needs block > 1 "
                                 "(with block=1, k is already the top-k tokens per query)")
        if self.index != DENSE and self.index != EXACT:
            return
        extra = {name: value for name, value in (("k_factor", self.k_factor), ("metric", self.metric),
                                                  ("scan", self.scan), ("train", self.train))
                 if value != getattr(MemorySpec, name)}
        extra.update(self.index_params)
        if extra:
            raise ValueError(f"memory {self.index!r} takes no Faiss options, got {extra}; they apply to Faiss "
                             "indices such as 'IVF1024,Flat'")

    @property
    def kind(self) -> str:
        """"dense", "exact" or "faiss"."""
        return self.index if self.index in (DENSE, EXACT) else "faiss"

    @classmethod
    def parse(cls, text: str) -> "MemorySpec":
        """A spec from its text form, e.g. "IVF1024,Flat k=32 nprobe=32 metric=l2"."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"memory must be a non-empty string such as 'dense', 'exact k=32' or "
                             f"'IVF1024,Flat k=32 nprobe=32', got {text!r}")
        index, *options = text.split()
        fields, params = {}, {}
        for option in options:
            name, sep, value = option.partition("=")
            if not sep or not name or not value:
                raise ValueError(f"memory {text!r}: options are name=value, got {option!r}")
            if name in fields or name in params:
                raise ValueError(f"memory {text!r}: {name!r} is given twice")
            if name in ("k", "k_factor", "ram_budget", "block", "token_k"):
                fields[name] = _number(name, value)
            elif name in ("metric", "scan", "train", "storage"):
                fields[name] = value
            elif name in SEARCH_PARAMS:
                params[name] = _number(name, value)
            else:
                raise ValueError(f"memory {text!r}: unknown option {name!r}; accepted: k, k_factor, metric, scan, train, "
                                 f"storage, ram_budget, block, token_k, {', '.join(SEARCH_PARAMS)}")
        return cls(index=index, index_params=params, **fields)

    @classmethod
    def coerce(cls, value) -> "MemorySpec":
        """A MemorySpec from a MemorySpec, its text form or its dict form (``to_dict``)."""
        if isinstance(value, MemorySpec):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict):
            unknown = set(value) - {"index", "k", "k_factor", "metric", "scan", "train", "storage", "ram_budget",
                                    "index_params", "block", "token_k"}
            if unknown:
                raise ValueError(f"memory: unknown fields {sorted(unknown)}; accepted: index, k, k_factor, metric, "
                                 "scan, train, storage, ram_budget, index_params, block, token_k")
            return cls(**value)
        raise ValueError(f"memory must be a MemorySpec, a string such as 'IVF1024,Flat k=32 nprobe=32' or a dict, "
                         f"got {type(value).__name__}")

    def replace(self, **changes) -> "MemorySpec":
        """A copy with ``changes`` applied (validated again)."""
        fields = self.to_dict()
        fields.update(changes)
        return MemorySpec(**fields)

    def to_dict(self) -> dict:
        return dict(index=self.index, k=self.k, k_factor=self.k_factor, metric=self.metric, scan=self.scan,
                    train=self.train, storage=self.storage, ram_budget=self.ram_budget,
                    index_params=dict(self.index_params), block=self.block, token_k=self.token_k)

    def __str__(self) -> str:
        if self.index == DENSE:
            return DENSE
        options = [f"k={self.k}"]
        options += [f"{name}={getattr(self, name)}" for name in ("k_factor", "metric", "scan", "train", "storage",
                                                                 "ram_budget")
                    if getattr(self, name) != getattr(MemorySpec, name)]
        options += [f"{name}={value}" for name, value in sorted(self.index_params.items())]
        options += [f"block={self.block}"] if self.block != 1 else []
        options += [f"token_k={self.token_k}"] if self.token_k else []
        return " ".join([self.index, *options])

    def __hash__(self) -> int:
        return hash(str(self))


def check_index_string(index) -> None:
    """Refuse, without calling Faiss, index strings that Faiss would abort, crash or hang on.

    Faiss itself rejects most malformed strings with an exception, but a few well-formed ones kill the process
    (measured with faiss-cpu 1.x): ``HNSW0`` aborts and ``HNSW1`` segfaults on add, ``PQ4x0`` divides by zero,
    ``RR0`` segfaults, ``NSG1``/``NSG2`` never return, ``IVF0`` fails only at search time.
    """
    if not isinstance(index, str) or not index or any(c.isspace() for c in index):
        raise ValueError(f"index must be 'dense', 'exact' or a Faiss index_factory string without spaces such as "
                         f"'Flat', 'IVF1024,Flat', 'HNSW32', got {index!r}")
    if index in (DENSE, EXACT):
        return
    zero = re.search(r"(?<![0-9])0+(?![0-9])", index)
    if zero:
        raise ValueError(f"index={index!r}: every size in a factory string must be at least 1 "
                         f"(found {zero.group()!r})")
    for match in re.finditer(r"HNSW(\d+)", index):
        if int(match.group(1)) < 2:
            raise ValueError(f"index={index!r}: HNSW needs M >= 2 neighbours per node, got {match.group(1)}")
    if "NSG" in index:
        raise ValueError(f"index={index!r}: NSG graphs are built once and cannot grow window by window; use HNSW")


def _int(name: str, value, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= high:
        raise ValueError(f"{name} must be an int in [1, {high}], got {value!r}")
    return int(value)


def _number(name: str, text: str):
    """An option's text value as an int if it is one (``32``, ``1e3``), else the text (refused by the checks)."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if math.isfinite(value) and value == int(value) else value


def _choice(name: str, value, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is unknown; accepted values: {accepted}")


def _search_params(params) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"index_params (Faiss search parameters) must be a dict such as {{'nprobe': 32}}, got {params!r}")
    checked = {}
    for name, value in params.items():
        if name not in SEARCH_PARAMS:
            raise ValueError(f"index_params: unknown Faiss search parameter {name!r}; accepted: "
                             f"{', '.join(SEARCH_PARAMS)}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= SEARCH_PARAMS[name]:
            raise ValueError(f"index_params: {name} must be an int in [1, {SEARCH_PARAMS[name]}], got {value!r}")
        checked[str(name)] = int(value)
    return checked
