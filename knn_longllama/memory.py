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

`BlockMemory` (block retrieval) offers whole blocks of consecutive tokens, the same for every query of a lookup;
such memories (`shared_entries`, DenseMemory too) also hand out those entries themselves, `entries_for(queries, h0,
h1)` -> keys, values `[B, h, K, d]` and valid `[B, h, K]`, which attention with `attn_implementation="sdpa"` reads
with fused kernels. `OverlayMemory` and `BlockOverlay` continue a read-only memory privately (`Document.ask`);
`SinkMemory` keeps a row's first tokens apart, attended by every query.

A memory whose entries are spread over several processes (dense memory under context parallelism) may answer a lookup
with a `SoftmaxPart` instead: the softmax statistics of the queries over all its entries, which attention combines
with the local scores in the same joint softmax.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch

FUSED_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # dtypes of the fused CPU attention kernel


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

    @classmethod
    def of_entries(cls, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   valid: torch.Tensor) -> "MemoryLookup":
        """The lookup of queries `[B, h, Q, d]` offered shared entries: keys, values `[B, h, K, d]`, valid `[B, h, K]`
        (scores in float32, as the stores re-score)."""
        scores = queries.detach().float() @ keys.float().transpose(-1, -2)
        return cls(scores=scores.to(queries.dtype), valid=valid[:, :, None, :], values=values)

    def top(self, k: int) -> "MemoryLookup":
        """Each query's k best-scoring valid entries (per-query values `[B, h, Q, k, d]`); all of them if fewer."""
        if k >= self.scores.shape[-1]:
            return self
        valid = self.valid.expand_as(self.scores)
        best = self.scores.masked_fill(~valid, float("-inf")).topk(k, dim=-1).indices  # [B, h, Q, k]
        values = self.values if self.values.dim() == 5 else \
            self.values[:, :, None].expand(-1, -1, best.shape[2], -1, -1)
        values = values.gather(3, best[..., None].expand(-1, -1, -1, -1, values.shape[-1]))
        return MemoryLookup(self.scores.gather(-1, best), valid.gather(-1, best), values)

    def mix(self, probs: torch.Tensor) -> torch.Tensor:
        """Attention-weighted sum of the values: probs `[B, h, Q, K]` -> `[B, h, Q, d]`."""
        values = self.values.to(probs.dtype)
        if values.dim() == 4:
            return probs @ values
        return (probs.unsqueeze(-2) @ values).squeeze(-2)


@dataclass
class SoftmaxPart:
    """Softmax statistics of a block of queries over a set of memory entries (log-sum-exp form), for attention that
    never sees the entries' scores one by one (each rank of a context-parallel group holds a share of them).

    max: `[B, h, Q]` the largest logit; total: `[B, h, Q]` the sum of exp(logit - max); weighted: `[B, h, Q, d]` the
    values summed with those weights; all float32. Logits are the attention's: `<q, k> * scale`, invalid entries set
    to `floor` and every logit clamped from below at it, as `LongLlamaAttention._attend_eager` does. A part of no
    entries has zero sums (its max is then any value).
    """

    max: torch.Tensor
    total: torch.Tensor
    weighted: torch.Tensor
    scale: float
    floor: float

    @classmethod
    def of(cls, found: MemoryLookup, scale: float, floor: float) -> "SoftmaxPart":
        logits = (found.scores * scale).masked_fill(~found.valid, floor).clamp_(min=floor).float()
        top = logits.amax(dim=-1)
        weights = torch.exp(logits - top[..., None])
        return cls(top, weights.sum(dim=-1), found.mix(weights), scale, floor)

    @classmethod
    def attention(cls, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                  scale: float, floor: float) -> "SoftmaxPart":
        """The statistics of queries `[B, h, Q, d]` over keys and values `[B, h, K, d]` with an additive `bias`
        broadcastable to `[B, h, Q, K]` (`floor` on blocked entries). On CPU one fused flash-attention call gives
        the output and its log-sum-exp (max = log-sum-exp, total = 1); elsewhere, and where gradients are needed (the
        kernel's log-sum-exp has none), the same numbers in plain matmuls."""
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (queries, keys, values))
        if queries.device.type == "cpu" and queries.dtype in FUSED_CPU_DTYPES and not needs_grad:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                queries, keys, values, 0.0, False, attn_mask=bias.to(queries.dtype), scale=scale)
            lse = lse.reshape(out.shape[:-1]).float()
            return cls(lse, torch.ones_like(lse), out.float(), scale, floor)
        logits = (queries.float() @ keys.float().transpose(-1, -2)).mul_(scale).add_(bias.float())
        top = logits.amax(dim=-1)
        weights = torch.exp(logits - top[..., None])
        return cls(top, weights.sum(dim=-1), weights @ values.float(), scale, floor)

    def output(self) -> torch.Tensor:
        """The attention output `[B, h, Q, d]` (float32) over this part's entries alone."""
        return self.weighted / self.total[..., None]

    def rescaled(self, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, weighted) relative to a larger max `top` instead of `self.max`."""
        factor = torch.exp(self.max - top)
        return self.total * factor, self.weighted * factor[..., None]

    def merge(self, other: "SoftmaxPart") -> "SoftmaxPart":
        """The statistics of both parts' entries together."""
        top = torch.maximum(self.max, other.max)
        (total, weighted), (total2, weighted2) = self.rescaled(top), other.rescaled(top)
        return SoftmaxPart(top, total + total2, weighted + weighted2, self.scale, self.floor)

    def attend(self, local: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Attention output `[B, h, Q, d]` (float32) of one softmax over local logits `[B, h, Q, T]` (scaled and
        masked) with values `[B, h, T, d]`, together with this part's entries."""
        local = local.clamp(min=self.floor).float()
        top = torch.maximum(local.amax(dim=-1), self.max)
        weights = torch.exp(local - top[..., None])
        total, weighted = self.rescaled(top)
        return (weights @ values.float() + weighted) / (weights.sum(dim=-1) + total)[..., None]


def joined_entries(*parts):
    """Shared entries `(keys, values, valid)` of several memories, one after the other (None parts skipped)."""
    parts = [p for p in parts if p is not None]
    if len(parts) < 2:
        return parts[0] if parts else None
    dtype = parts[-1][0].dtype
    return tuple(torch.cat([p[i].to(dtype) if i < 2 else p[i] for p in parts], dim=2) for i in range(3))


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
    shared_entries = True  # every query of a lookup is offered the same entries (`entries_for`)

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

    def entries_for(self, queries: torch.Tensor, h0: int, h1: int):
        """See `BlockMemory.entries_for`; here every stored entry."""
        entries = self.entries()
        if entries is None:
            return None
        keys, values, valid = entries
        return keys[:, h0:h1], values[:, h0:h1], valid[:, None].expand(-1, h1 - h0, -1)

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


def block_token_ids(chosen: list, sizes: list[int], block: int, heads: int, device) -> torch.Tensor | None:
    """Token ids `[B, heads, K]` a block lookup offers per row: the tokens of the row's chosen blocks (`[heads, k]`
    block numbers, -1 = none; None: no complete block) followed by its last, incomplete block; -1 pads (None if
    nothing is offered)."""
    rows = []
    for found, n in zip(chosen, sizes):
        ids = torch.arange(n // block * block, n, device=device).expand(heads, -1)
        if found is not None:
            tokens = found.clamp_min(0)[:, :, None] * block + torch.arange(block, device=device)
            ids = torch.cat([tokens.masked_fill((found < 0)[:, :, None], -1).reshape(heads, -1), ids], dim=1)
        rows.append(ids)
    width = max(row.shape[1] for row in rows)
    if width == 0:
        return None
    out = torch.full((len(rows), heads, width), -1, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        out[b, :, : row.shape[1]] = row
    return out


class BlockMemory:
    """Top-k blocks: the memory is cut into blocks of `spec.block` consecutive real tokens per row. A lookup retrieves,
    per row and KV head, the k blocks whose representative key (the mean of the block's keys) scores highest against
    the mean of the lookup's queries, plus the row's last, incomplete block, and offers all their tokens to every
    query (exact scores), or with `spec.token_k` > 0 each query's token_k best of them. The representatives are
    searched with the spec's index (a `knn_index.KnnStore`, in RAM); the tokens live in the spec's storage: tensors
    (`ram`) or files read back block by block (`disk`, see `knn_index.disk`; `directory`, `verify` as in
    `KnnStore`). docs/semantics.md#block-retrieval.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, spec, *, dtype: torch.dtype, device,
                 directory=None, verify: bool = True):
        import knn_index
        from knn_index.spec import DEFAULT_RAM_BUDGET
        from knn_index.storage import RowStorage

        self.block, self.k, self.dtype, self.device = spec.block, spec.k, dtype, torch.device(device)
        self.token_k = spec.token_k
        self.shared_entries = spec.token_k == 0  # every query of a lookup is offered the same entries (`entries_for`)
        self.shape = (batch_size, num_kv_heads, head_dim)
        self.index = knn_index.KnnStore(batch_size, num_kv_heads, head_dim,
                                        spec.replace(block=1, token_k=0, storage="ram",
                                                     ram_budget=DEFAULT_RAM_BUDGET),
                                        dtype=torch.float32, device=device)
        if spec.storage == "disk":
            from knn_index.disk import DiskStorage

            self.store = DiskStorage(directory, batch_size, num_kv_heads, head_dim, dtype, device, spec.ram_budget,
                                     verify)
        elif directory is not None:
            raise ValueError(f"directory={os.fspath(directory)!r} is for storage=disk; spec '{spec}' keeps its "
                             "tokens in RAM")
        else:
            self.store = RowStorage(batch_size, num_kv_heads, head_dim, dtype, device)

    def reset(self) -> None:
        self.store.reset()
        self.index.reset()

    def sizes(self) -> list[int]:
        return list(self.store.sizes)

    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        B, H, d = self.shape
        before = self.sizes()
        rows = []
        for b in range(B):
            sel = mask[b].bool()
            rows.append((keys[b][:, sel].detach().to(self.dtype), values[b][:, sel].detach().to(self.dtype))
                        if bool(sel.any()) else None)
        self.store.append_rows(rows)
        reps = []
        for b, n in enumerate(self.store.sizes):
            first, last = before[b] // self.block, n // self.block  # blocks completed by this add
            block_keys = torch.from_numpy(self.store.float_keys(b, first * self.block, last * self.block))
            reps.append(block_keys.reshape(H, last - first, self.block, d).mean(2).to(self.device))
        width = max(r.shape[1] for r in reps)
        if width == 0:
            return
        padded = torch.zeros(B, H, width, d, device=self.device)
        valid = torch.zeros(B, width, dtype=torch.bool, device=self.device)
        for b, r in enumerate(reps):
            padded[b, :, : r.shape[1]], valid[b, : r.shape[1]] = r, True
        self.index.add(padded, padded, valid)

    def token_ids(self, queries: torch.Tensor, h0: int, h1: int) -> torch.Tensor | None:
        """The ids `[B, h1 - h0, K]` (-1 = none) of the tokens a lookup of `queries` `[B, h1 - h0, Q, d]` offers:
        the k blocks best matching the queries' mean, then the last, incomplete block; None while empty."""
        if len(self) == 0:
            return None
        B, h = queries.shape[0], h1 - h0
        blocks = None
        if len(self.index) > 0:
            mean = queries.detach().float().mean(2, keepdim=True)  # [B, h, 1, d]
            blocks = self.index.search(mean, k=self.k, heads=slice(h0, h1)).ids[:, :, 0]  # [B, h, k'], -1 = none
        return block_token_ids([None if blocks is None else blocks[b] for b in range(B)], self.sizes(), self.block,
                               h, queries.device)

    def entries_for(self, queries: torch.Tensor, h0: int, h1: int):
        """The entries offered to every query in `queries` `[B, h1 - h0, Q, d]` of KV heads `h0:h1`: keys and values
        `[B, h1 - h0, K, d]` (in `dtype`) and valid bool `[B, h1 - h0, K]` (tokens of `token_ids`); None while
        empty."""
        ids = self.token_ids(queries, h0, h1)
        if ids is None:
            return None
        heads, at = list(range(h0, h1)), ids.clamp_min(0)[:, :, None]  # [B, h, 1, K]
        keys, values = (self.store.take(name, at, heads)[:, :, 0] for name in ("keys", "values"))
        return keys.to(queries.device), values.to(queries.device), ids >= 0

    def lookup(self, queries: torch.Tensor, h0: int, h1: int) -> MemoryLookup | None:
        entries = self.entries_for(queries, h0, h1)
        if entries is None:
            return None
        found = MemoryLookup.of_entries(queries, *entries)
        return found.top(self.token_k) if self.token_k else found

    def __len__(self) -> int:
        return max(self.sizes())

    def nbytes(self) -> int:
        return self.store.nbytes() + self.index.nbytes()

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` tokens per row (RAM: allocated exactly; disk: the free space checked)."""
        self.store.reserve(tokens)

    def close(self) -> None:
        """Close a disk memory's files (a temporary folder is removed); nothing to do in RAM."""
        self.store.close()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Row sizes, the representatives' index and, in RAM, the tokens of every row (zeros past a shorter row's
        end); a disk memory's tokens stay in its files."""
        B, H, d = self.shape
        state = {"sizes": torch.tensor(self.sizes(), dtype=torch.int64)}
        if getattr(self.store, "directory", None) is None:
            keys, values = self.store.entries(slice(None), len(self))
            state.update(keys=keys.contiguous(), values=values.contiguous())
        state.update({f"index.{name}": t for name, t in self.index.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load `state_dict` output, checked: shapes, sizes, and one representative per complete block. A disk
        memory takes a state without tokens when its files hold exactly those row sizes (a saved memory, opened)."""
        B, H, d = self.shape
        sizes = state.get("sizes")
        if sizes is None or sizes.dtype != torch.int64 or tuple(sizes.shape) != (B,) or bool((sizes < 0).any()):
            raise ValueError(f"block memory state needs int64 'sizes' of shape ({B},) >= 0")
        on_disk = getattr(self.store, "directory", None) is not None and "keys" not in state
        n = int(sizes.max())
        for name in ("keys", "values") if not on_disk else ():
            t = state.get(name)
            if t is None or not t.is_floating_point() or tuple(t.shape) != (B, H, n, d):
                raise ValueError(f"block memory state[{name!r}] must be a float tensor of shape {(B, H, n, d)}")
        tokens = ("sizes",) if on_disk else ("sizes", "keys", "values")
        unexpected = [name for name in state if name not in tokens and not name.startswith("index.")]
        if unexpected:
            raise ValueError(f"block memory state holds unexpected tensors {unexpected}")
        if on_disk and sizes.tolist() != self.sizes():
            raise ValueError(f"block memory state: row sizes {sizes.tolist()}, but the files in "
                             f"{self.store.directory!r} hold {self.sizes()} tokens per row")
        index_state = {name[6:]: t for name, t in state.items() if name.startswith("index.")}
        self.index.load_state_dict(index_state)
        if self.index.sizes() != [int(s) // self.block for s in sizes]:
            self.index.reset()
            raise ValueError(f"block memory state: the index holds {self.index.sizes()} representatives for rows of "
                             f"{sizes.tolist()} tokens in blocks of {self.block}")
        if not on_disk:
            self.store.reset()
            self.store.append_rows([(state["keys"][b, :, :size].to(self.dtype), state["values"][b, :, :size]
                                     .to(self.dtype)) if size else None for b, size in enumerate(sizes.tolist())])


class BlockOverlay:
    """A read-only `BlockMemory` continued by private adds (a question's evictions): its lookups are those of the
    base after the same adds, with the base unchanged. The new tokens, and the blocks they complete (the base's
    incomplete last block included), stay in the overlay; representatives of new blocks are scored exactly and
    compete with the base's search results for the k blocks, so with an exact base index (`exact`, `Flat`) a lookup
    retrieves what the base itself would."""

    def __init__(self, base: BlockMemory):
        from knn_index.storage import RowStorage

        self.base, self.dtype, self.block, self.k = base, base.dtype, base.block, base.k
        self.token_k, self.shared_entries = base.token_k, base.shared_entries
        B, H, d = base.shape
        self.start = base.sizes()  # tokens per row in the base; overlay token i of row b is token start[b] + i
        self.extra = RowStorage(B, H, d, base.dtype, base.device)
        self.reps = [torch.zeros(H, 0, d, device=base.device) for _ in range(B)]  # blocks completed in the overlay

    def _keys(self, b: int, start: int, stop: int) -> torch.Tensor:
        """Float32 keys `[H, n, d]` of row b's tokens [start, stop) of base and overlay together."""
        cut = self.start[b]
        parts = [self.base.store.float_keys(b, start, min(stop, cut))] if start < cut else []
        parts += [self.extra.float_keys(b, max(start, cut) - cut, stop - cut)] if stop > cut else []
        return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))

    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        H, d = self.base.shape[1:]
        before = self.sizes()
        self.extra.append_rows([(keys[b][:, sel].detach().to(self.dtype), values[b][:, sel].detach().to(self.dtype))
                                if bool(sel.any()) else None for b, sel in enumerate(mask.bool())])
        for b, n in enumerate(self.sizes()):
            first, last = before[b] // self.block, n // self.block
            if last > first:
                reps = self._keys(b, first * self.block, last * self.block).reshape(H, -1, self.block, d).mean(2)
                self.reps[b] = torch.cat([self.reps[b], reps.to(self.reps[b].device)], dim=1)

    def sizes(self) -> list[int]:
        return [s + n for s, n in zip(self.start, self.extra.sizes)]

    def __len__(self) -> int:
        return max(self.sizes())

    def entries_for(self, queries: torch.Tensor, h0: int, h1: int):
        """See `BlockMemory.entries_for`."""
        if len(self) == 0:
            return None
        B, h, block, device = queries.shape[0], h1 - h0, self.block, queries.device
        mean = queries.detach().float().mean(2, keepdim=True)  # [B, h, 1, d]
        if len(self.base.index) > 0:
            found = self.base.index.search(mean, k=self.k, heads=slice(h0, h1))
            base_ids, base_scores = found.ids[:, :, 0], found.scores[:, :, 0].float()
        else:
            base_ids = torch.full((B, h, 0), -1, dtype=torch.long, device=device)
            base_scores = torch.zeros(B, h, 0, device=device)
        chosen = []
        for b in range(B):
            reps = self.reps[b][h0:h1].to(device)  # [h, m, d], blocks start[b] // block + 0..m-1
            scores = torch.cat([base_scores[b].masked_fill(base_ids[b] < 0, float("-inf")),
                                (reps @ mean[b, :, 0, :, None])[..., 0]], dim=1)
            ids = torch.cat([base_ids[b], self.start[b] // block + torch.arange(reps.shape[1], device=device)
                             .expand(h, -1)], dim=1)
            top = scores.topk(min(self.k, scores.shape[1]), dim=1)
            chosen.append(ids.gather(1, top.indices).masked_fill(top.values == float("-inf"), -1))
        ids = block_token_ids(chosen, self.sizes(), block, h, device)
        if ids is None:
            return None
        start = torch.tensor(self.start, device=device).view(B, 1, 1, 1)
        at = ids.clamp_min(0)[:, :, None]  # [B, h, 1, K]
        heads = list(range(h0, h1))
        out = []
        zeros = torch.zeros(*at.shape, self.base.shape[2], dtype=self.dtype, device=device)
        for name in ("keys", "values"):
            old = self.base.store.take(name, at.minimum((start - 1).clamp_min(0)), heads).to(device) \
                if max(self.start) else zeros
            new = self.extra.take(name, (at - start).clamp(0, self.extra.capacity - 1), heads).to(device) \
                if self.extra.capacity else zeros
            out.append(torch.where((at < start)[..., None], old, new)[:, :, 0])
        return out[0], out[1], ids >= 0

    lookup = BlockMemory.lookup  # the same lookup over this overlay's entries


def overlay(memory):
    """A private continuation of a read-only memory (see `OverlayMemory`, `BlockOverlay`)."""
    return BlockOverlay(memory) if isinstance(memory, BlockMemory) else OverlayMemory(memory)


def make_memory(spec, batch_size: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype, device,
                directory=None, verify: bool = True):
    """An empty memory for one memory layer: `DenseMemory` for spec "dense", `BlockMemory` for a spec with
    block > 1, else a `KnnMemory`.

    spec: a `knn_index.MemorySpec` (or its text / dict form, validated here). directory, verify: where a
    `storage=disk` memory keeps its files (see `knn_index.KnnStore`)."""
    from knn_index import MemorySpec

    spec = MemorySpec.coerce(spec)
    if spec.kind == "dense":
        return DenseMemory(dtype)
    if spec.block > 1:
        return BlockMemory(batch_size, num_kv_heads, head_dim, spec, dtype=dtype, device=device, directory=directory,
                           verify=verify)
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
        self.base, self.dtype = base, base.dtype
        self.overlay = DenseMemory(base.dtype)
        self.all_entries = getattr(base, "all_entries", False)
        self.shared_entries = getattr(base, "shared_entries", False)

    def entries_for(self, queries: torch.Tensor, h0: int, h1: int):
        """The base's shared entries followed by every overlay entry (see `BlockMemory.entries_for`)."""
        return joined_entries(self.base.entries_for(queries, h0, h1), self.overlay.entries_for(queries, h0, h1))

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Base entries followed by the overlay's (dense base only; see `DenseMemory.entries`)."""
        base, extra = self.base.entries(), self.overlay.entries()
        if base is None or extra is None:
            return base if extra is None else extra
        return tuple(torch.cat([a, b], dim=-1 if a.dim() == 2 else 2) for a, b in zip(base, extra))

    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        self.overlay.add(keys, values, mask)

    def lookup(self, queries: torch.Tensor, h0: int, h1: int) -> MemoryLookup | SoftmaxPart | None:
        extra = self.overlay.lookup(queries, h0, h1)
        base = self.base.lookup(queries, h0, h1)
        if extra is None:
            return base
        if isinstance(base, SoftmaxPart):  # a sharded dense base answers with statistics: add the overlay's
            return base.merge(SoftmaxPart.of(extra, base.scale, base.floor))
        parts = [extra] if base is None else [base, extra]
        scores = torch.cat([p.scores for p in parts], dim=-1)
        k = None if self.shared_entries else getattr(self.base, "k", None)  # kNN base: top-k of base and overlay
        if all(p.values.dim() == 4 for p in parts) and (k is None or k >= scores.shape[-1]):  # every entry
            heads = max(p.valid.shape[1] for p in parts)  # each [B, 1 or h, 1, n]
            valid = torch.cat([p.valid.expand(-1, heads, -1, -1) for p in parts], dim=-1)
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


class SinkMemory:
    """A memory whose first `n` entries per row (the document's first real tokens) are offered to every query.

    Training-free reading (docs/semantics.md#training-free): the first tokens of a text absorb attention that a
    pretrained model has nowhere else to put ("attention sinks"); here they are kept aside, outside the searched
    memory, and every lookup returns them beside what `base` finds. `len()` counts both.
    """

    def __init__(self, base, n: int):
        self.base, self.n = base, n
        self.dtype = base.dtype
        self.sinks = DenseMemory(base.dtype)
        self.taken = None  # [B] sink tokens captured per row; None until the first add
        self.shared_entries = getattr(base, "shared_entries", False)

    def entries_for(self, queries: torch.Tensor, h0: int, h1: int):
        """The sinks followed by the base's shared entries (see `BlockMemory.entries_for`)."""
        return joined_entries(self.sinks.entries_for(queries, h0, h1), self.base.entries_for(queries, h0, h1))

    def with_base(self, base) -> "SinkMemory":
        """A copy of these sinks over another base (e.g. an `OverlayMemory` of this one's base)."""
        other = SinkMemory(base, self.n)
        other.sinks.load_state_dict(self.sinks.state_dict())
        other.taken = self.taken
        return other

    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        mask = mask.bool()
        if self.taken is None:
            self.taken = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        room = self.n - self.taken
        if bool((room > 0).any()):
            rank = mask.long().cumsum(-1)  # 1-based rank of each real token among this window's real tokens
            sink = mask & (rank <= room[:, None])
            count = sink.sum(-1)
            width = int(count.max())
            if width > 0:  # the chosen tokens of every row, left-aligned, padded with invalid slots
                order = torch.sort((~sink).long(), dim=-1, stable=True).indices[:, :width]
                pick = lambda t: t.gather(2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))  # noqa
                valid = torch.arange(width, device=mask.device)[None, :] < count[:, None]
                self.sinks.add(pick(keys), pick(values), valid)
                self.taken = self.taken + count
            mask = mask & ~sink
        self.base.add(keys, values, mask)

    def lookup(self, queries: torch.Tensor, h0: int, h1: int) -> MemoryLookup | None:
        found = self.base.lookup(queries, h0, h1)
        sinks = self.sinks.lookup(queries, h0, h1)
        if sinks is None or found is None:
            return found if sinks is None else sinks
        q = queries.shape[2]
        if found.values.dim() == 4:  # entries shared by every query
            values = torch.cat([sinks.values.to(found.values.dtype), found.values], dim=2)
            heads = max(sinks.valid.shape[1], found.valid.shape[1])  # [B, 1 or h, 1, n] each
            valid = torch.cat([v.expand(-1, heads, -1, -1) for v in (sinks.valid, found.valid)], dim=-1)
            return MemoryLookup(torch.cat([sinks.scores.to(found.scores.dtype), found.scores], dim=-1), valid, values)
        per_query = sinks.values[:, :, None].expand(-1, -1, q, -1, -1).to(found.values.dtype)
        valid = torch.cat([sinks.valid.expand_as(sinks.scores), found.valid.expand_as(found.scores)], dim=-1)
        return MemoryLookup(torch.cat([sinks.scores.to(found.scores.dtype), found.scores], dim=-1), valid,
                            torch.cat([per_query, found.values], dim=3))

    def __len__(self) -> int:
        return len(self.base) + (0 if self.taken is None else int(self.taken.max()))

    def nbytes(self) -> int:
        return self.base.nbytes() + self.sinks.nbytes()

    def reset(self) -> None:
        self.base.reset()
        self.sinks.reset()
        self.taken = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"base.{name}": t for name, t in self.base.state_dict().items()}
        if self.taken is not None:
            state.update({f"sinks.{name}": t for name, t in self.sinks.state_dict().items()})
            state["sinks.taken"] = self.taken
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load `state_dict` output; the sink tensors are checked against `n` and against each other."""
        unknown = [name for name in state if not name.startswith(("base.", "sinks."))]
        if unknown:
            raise ValueError(f"state of a SinkMemory holds unknown tensors {unknown}")
        self.sinks.reset()  # not the base: its load replaces it, and a disk base keeps its opened files
        self.taken = None
        sinks = {name[6:]: t for name, t in state.items() if name.startswith("sinks.")}
        if sinks:
            taken = sinks.pop("taken", None)
            if set(sinks) != {"keys", "values", "mask"} or taken is None or taken.dtype != torch.int64 or \
                    taken.dim() != 1:
                raise ValueError(f"sink state needs keys, values, mask and int64 taken; got {sorted(state)}")
            keys, values, mask = sinks["keys"], sinks["values"], sinks["mask"]
            B = taken.shape[0]
            if keys.dim() != 4 or keys.shape != values.shape or keys.shape[0] != B or keys.shape[2] > self.n or \
                    tuple(mask.shape) != (B, keys.shape[2]) or mask.dtype != torch.bool or \
                    not torch.equal(mask.sum(-1), taken) or bool((taken > self.n).any()):
                raise ValueError(f"sink state of {tuple(keys.shape)} keys, mask {tuple(mask.shape)} and taken "
                                 f"{taken.tolist()} is not a sink memory of at most {self.n} tokens per row")
            self.sinks.add(keys, values, mask)
            self.taken = taken.clone()
        self.base.load_state_dict({name[5:]: t for name, t in state.items() if name.startswith("base.")})
