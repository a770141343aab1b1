"""Memory of one memory layer: what the attention layer adds windows to and looks queries up in.

A memory object holds, for each batch row (document) and each KV head, the raw (un-rotated) keys and values of
earlier windows. The attention layer talks to it through two calls:

- `add(keys, values, mask)`: append a window; keys/values `[B, H_kv, T, d]`, mask `[B, T]` (True = real token).
- `lookup(queries, h0, h1)`: for queries `[B, h1 - h0, Q, d]` of KV heads `h0:h1`, return a `MemoryLookup` with raw
  inner products `<q, k_i>` for the entries this memory offers, which of them are valid, and their values.

`DenseMemory` offers every stored entry (the official LongLLaMA behaviour); it also hands them out whole
(`entries()`, flagged by `all_entries`) for attention with fused SDPA (`attn_implementation="sdpa"`). `KnnMemory` offers
the top-k entries per query found in per-(row, head) Faiss indices (or exact torch top-k) with exact re-scored inner
products.
"""

from dataclasses import dataclass

import torch


@dataclass
class MemoryLookup:
    """Memory entries offered to a block of queries.

    scores: `[B, h, Q, K]` raw inner products `<q, k_i>` (not yet scaled by 1/sqrt(d)).
    valid: bool, broadcastable to `scores`; False entries must get no attention (padding, missing neighbours).
    values: `[B, h, K, d]` shared by all queries (dense), or `[B, h, Q, K, d]` per query (kNN).
    """

    scores: torch.Tensor
    valid: torch.Tensor
    values: torch.Tensor

    def mix(self, probs: torch.Tensor) -> torch.Tensor:
        """Attention-weighted sum of the values: probs `[B, h, Q, K]` -> `[B, h, Q, d]`."""
        values = self.values.to(probs.dtype)
        if values.dim() == 4:
            return probs @ values
        return (probs.unsqueeze(-2) @ values).squeeze(-2)


class _GrowingBuffer:
    """A `[B, H, N, d]` tensor appended to along N with capacity doubling (amortised O(1) per token)."""

    def __init__(self):
        self.data = None
        self.length = 0

    def append(self, chunk: torch.Tensor) -> None:
        n = chunk.shape[2]
        if self.data is None:
            self.data = torch.empty(*chunk.shape[:2], max(n, 1), *chunk.shape[3:], dtype=chunk.dtype, device=chunk.device)
        elif self.length + n > self.data.shape[2]:
            capacity = max(self.length + n, 2 * self.data.shape[2])
            grown = torch.empty(*self.data.shape[:2], capacity, *self.data.shape[3:], dtype=self.data.dtype,
                                device=self.data.device)
            grown[:, :, : self.length] = self.data[:, :, : self.length]
            self.data = grown
        self.data[:, :, self.length : self.length + n] = chunk
        self.length += n

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[:, :, : self.length]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class DenseMemory:
    """Every stored (key, value) is attended by every query (official FoT memory)."""

    all_entries = True  # lookups offer every stored entry, so attention may read `entries()` with fused SDPA

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.keys = _GrowingBuffer()
        self.values = _GrowingBuffer()
        self.mask = _GrowingBuffer()  # [B, 1, N] bool

    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        self.keys.append(keys.detach().to(self.dtype))
        self.values.append(values.detach().to(self.dtype))
        self.mask.append(mask.detach().bool()[:, None, :])

    def lookup(self, queries: torch.Tensor, h0: int, h1: int) -> MemoryLookup | None:
        if len(self) == 0:
            return None
        keys = self.keys.view()[:, h0:h1].to(queries.dtype)
        return MemoryLookup(
            scores=queries @ keys.transpose(-1, -2),
            valid=self.mask.view()[:, :, None, :],
            values=self.values.view()[:, h0:h1],
        )

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every stored entry: keys and values `[B, H_kv, N, d]` (in `dtype`) and valid bool `[B, N]`; None while
        empty."""
        if len(self) == 0:
            return None
        return self.keys.view(), self.values.view(), self.mask.view()[:, 0]

    def __len__(self) -> int:
        return self.keys.length

    def truncate(self, length: int) -> None:
        """Forget everything added after the first `length` tokens (used to restore a read state)."""
        for buffer in (self.keys, self.values, self.mask):
            buffer.truncate(length)

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes() + self.mask.nbytes()

    def reset(self) -> None:
        self.__init__(self.dtype)

    def close(self) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        if len(self) == 0:
            return {}
        return {"keys": self.keys.view(), "values": self.values.view(), "mask": self.mask.view()[:, 0]}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        if state:
            self.add(state["keys"], state["values"], state["mask"])


class KnnMemory:
    """Top-k memory: per (row, KV head) kNN search, exact re-scoring of the retrieved keys, one joint softmax.

    With k >= the number of stored tokens it offers every entry, as `DenseMemory` does, without searching or
    gathering a copy of the values per query.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, spec, *, dtype: torch.dtype, device,
                 directory=None, verify: bool = True):
        import knn_index  # the Faiss side is only needed by the kNN backends

        self.store = knn_index.KnnStore(batch_size, num_kv_heads, head_dim, spec, dtype=dtype, device=device,
                                        directory=directory, verify=verify)
        self.k, self.dtype = self.store.spec.k, dtype

    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        self.store.add(keys.detach(), values.detach(), mask.bool())

    def lookup(self, queries: torch.Tensor, h0: int, h1: int) -> MemoryLookup | None:
        if len(self.store) == 0:
            return None
        if self.k >= len(self.store):  # the top-k is the whole memory
            keys, values, valid = self.store.entries(slice(h0, h1))
            scores = queries.detach().float() @ keys.float().transpose(-1, -2)  # float32, as the store re-scores
            return MemoryLookup(scores=scores.to(queries.dtype), valid=valid[:, None, None, :], values=values)
        found = self.store.search(queries.detach(), heads=slice(h0, h1))
        return MemoryLookup(scores=found.scores.to(queries.dtype), valid=found.ids >= 0, values=found.values)

    def __len__(self) -> int:
        return len(self.store)

    def nbytes(self) -> int:
        return self.store.nbytes()

    def reserve(self, tokens: int) -> None:
        """See `KnnStore.reserve`."""
        self.store.reserve(tokens)

    def close(self) -> None:
        """Close a disk memory's files (see `KnnStore.close`)."""
        self.store.close()

    def reset(self) -> None:
        self.store.reset()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.store.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.store.load_state_dict(state)


def make_memory(spec, batch_size: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype, device,
                directory=None, verify: bool = True):
    """An empty memory for one memory layer: `DenseMemory` for spec "dense", else a `KnnMemory`.

    spec: a `knn_index.MemorySpec` (or its text / dict form, validated here). directory, verify: where a
    `storage=disk` memory keeps its files (see `knn_index.KnnStore`)."""
    from knn_index import MemorySpec

    spec = MemorySpec.coerce(spec)
    if spec.kind == "dense":
        return DenseMemory(dtype)
    return KnnMemory(batch_size, num_kv_heads, head_dim, spec, dtype=dtype, device=device, directory=directory,
                     verify=verify)


def crossbatch_sources(batch_size: int, extra_contexts: int, device=None) -> torch.Tensor:
    """FoT cross-batch: `[B, extra_contexts]` indices of the rows each row attends to (b-1, ..., b-extra_contexts),
    -1 where that row does not exist."""
    rows = torch.arange(batch_size, device=device)[:, None]
    sources = rows - torch.arange(1, extra_contexts + 1, device=device)[None, :]
    return sources.masked_fill(sources < 0, -1)


class CrossBatchMemory:
    """FoT training memory: the un-rotated keys/values of earlier rows of the same batch, with gradients.

    Row b sees rows b-1 .. b-extra_contexts: earlier chunks of its own stream (positives) and, across a stream
    boundary, chunks of other streams (negatives). Built per memory layer from that layer's keys and values.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, extra_contexts: int):
        bsz, heads, length, dim = keys.shape
        sources = crossbatch_sources(bsz, extra_contexts, keys.device)  # [B, E]
        safe = sources.clamp(min=0)
        # [B, E, H, T, d] -> [B, H, E*T, d]
        self.keys = keys[safe].permute(0, 2, 1, 3, 4).reshape(bsz, heads, extra_contexts * length, dim)
        self.values = values[safe].permute(0, 2, 1, 3, 4).reshape(bsz, heads, extra_contexts * length, dim)
        valid = mask.bool()[safe] & (sources >= 0)[:, :, None]  # [B, E, T]
        self.valid = valid.reshape(bsz, 1, 1, extra_contexts * length)

    def lookup(self, queries: torch.Tensor, h0: int, h1: int) -> MemoryLookup:
        keys = self.keys[:, h0:h1].to(queries.dtype)
        return MemoryLookup(scores=queries @ keys.transpose(-1, -2), valid=self.valid, values=self.values[:, h0:h1])


class OverlayMemory:
    """A read-only base memory plus a private overlay that receives every `add`.

    Used to ask questions about a document without changing its memory: the windows and evictions of one question
    go to the overlay, which is dropped afterwards. Lookups see base and overlay together; for a kNN base the merged
    candidates are cut back to the base's k by exact score, so the result is the top-k of base ∪ overlay.
    """

    def __init__(self, base):
        self.base = base
        self.overlay = DenseMemory(base.dtype)
        self.all_entries = getattr(base, "all_entries", False)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Base entries followed by the overlay's (dense base only; see `DenseMemory.entries`)."""
        base, extra = self.base.entries(), self.overlay.entries()
        if base is None or extra is None:
            return base if extra is None else extra
        return tuple(torch.cat([a, b], dim=-1 if a.dim() == 2 else 2) for a, b in zip(base, extra))

    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        self.overlay.add(keys, values, mask)

    def lookup(self, queries: torch.Tensor, h0: int, h1: int) -> MemoryLookup | None:
        extra = self.overlay.lookup(queries, h0, h1)
        base = self.base.lookup(queries, h0, h1)
        if extra is None:
            return base
        parts = [extra] if base is None else [base, extra]
        scores = torch.cat([p.scores for p in parts], dim=-1)
        k = getattr(self.base, "k", None)  # kNN base: keep the top-k of base and overlay together
        if all(p.values.dim() == 4 for p in parts) and (k is None or k >= scores.shape[-1]):  # every entry
            valid = torch.cat([p.valid for p in parts], dim=-1)  # each [B, 1, 1, n]
            return MemoryLookup(scores, valid, torch.cat([p.values.to(extra.values.dtype) for p in parts], dim=2))
        q = queries.shape[2]
        per_query = lambda v: v if v.dim() == 5 else v[:, :, None].expand(-1, -1, q, -1, -1)  # noqa: E731
        valid = torch.cat([p.valid.expand_as(p.scores) for p in parts], dim=-1)
        values = torch.cat([per_query(p.values).to(extra.values.dtype) for p in parts], dim=3)
        top = scores.masked_fill(~valid, float("-inf")).topk(min(k, scores.shape[-1]), dim=-1).indices
        gather = lambda t: t.gather(-1, top)  # noqa: E731
        values = values.gather(3, top[..., None].expand(-1, -1, -1, -1, values.shape[-1]))
        return MemoryLookup(gather(scores), gather(valid), values)

    def __len__(self) -> int:
        return len(self.base) + len(self.overlay)
