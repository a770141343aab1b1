"""Context parallelism: one document's kNN memory sharded across the ranks of a torch.distributed group.

Every rank holds the model (weights replicated) and runs it on the same tokens, so every rank computes the same
queries; only the memory is split. Window w of a memory layer is stored by rank w % world_size (round robin), every
rank searches its shard with the same spec, and the candidates of all shards (exact scores, validity, values) are
gathered with `all_gather` and cut to the global top-k. Since each shard returns its own exact top-k by exact score,
the top-k of their union is the top-k of the whole memory: with exact indices (exact, Flat) the output equals the
single-process output. This is Faiss's `IndexShards` merge, across processes.

    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))   # or torchrun
    doc = Document.read(model, ids, memory_spec="Flat k=32", context_parallel=True)
    doc.ask(question)        # the same answer on every rank

Dense memory is not sharded (it would need the softmax statistics of every shard merged inside attention).
"""

import torch
import torch.distributed as dist

from .memory import KnnMemory, MemoryLookup


class ShardedMemory:
    """A `KnnMemory` holding this rank's share of the windows of one memory layer; lookups merge all ranks'."""

    def __init__(self, local: KnnMemory, group=None):
        if not isinstance(local, KnnMemory):
            raise ValueError("context_parallel shards kNN memory only; use a memory spec such as 'Flat k=32' or "
                             "'IVF1024,Flat k=32 nprobe=32', not 'dense'")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("context_parallel needs torch.distributed initialised (torchrun, or "
                             "torch.distributed.init_process_group)")
        self.local, self.group, self.k, self.dtype = local, group, local.k, local.dtype
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.windows = 0  # windows added so far, on every rank alike
        self.tokens = 0  # real tokens in the whole (all-rank) memory, largest row

    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        if self.windows % self.world_size == self.rank:
            self.local.add(keys, values, mask)
        self.windows += 1
        self.tokens += int(mask.sum(dim=1).max())

    def lookup(self, queries: torch.Tensor, h0: int, h1: int) -> MemoryLookup | None:
        if self.tokens == 0:
            return None
        found = self.local.lookup(queries, h0, h1)
        B, h, Q = queries.shape[:3]
        d = self.local.store.head_dim
        size = torch.tensor([0 if found is None else found.scores.shape[-1]], device=queries.device)
        self._collective(dist.all_reduce, size, op=dist.ReduceOp.MAX)
        K = int(size)
        scores = queries.new_full((B, h, Q, K), float("-inf"))
        valid = torch.zeros(B, h, Q, K, dtype=torch.bool, device=queries.device)
        values = torch.zeros(B, h, Q, K, d, dtype=self.local.store.dtype, device=queries.device)
        if found is not None:
            n = found.scores.shape[-1]
            scores[..., :n] = found.scores
            valid[..., :n] = found.valid
            values[..., :n, :] = found.values if found.values.dim() == 5 else found.values[:, :, None]
        parts = [self._gather(t) for t in (scores, valid, values)]
        scores, valid, values = (torch.cat(p, dim=3) for p in parts)
        top = scores.masked_fill(~valid, float("-inf")).topk(min(self.k, scores.shape[-1]), dim=-1).indices
        values = values.gather(3, top[..., None].expand(-1, -1, -1, -1, d))
        return MemoryLookup(scores.gather(-1, top), valid.gather(-1, top), values)

    def _gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective(dist.all_gather, out, tensor)
        return out

    def _collective(self, collective, *args, **kwargs) -> None:
        try:
            collective(*args, group=self.group, **kwargs)
        except RuntimeError as error:  # a rank died or timed out: the same clear error on every surviving rank
            raise RuntimeError(f"context parallel: rank {self.rank} of {self.world_size} lost its peers during a "
                               f"memory lookup ({str(error).splitlines()[0]})") from None

    def __len__(self) -> int:
        return self.tokens

    def nbytes(self) -> int:
        return self.local.nbytes()

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise ValueError("a context-parallel memory is not saved yet: save needs every rank's shard; read the "
                         "document in one process to save it")
