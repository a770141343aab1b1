"""Context parallelism: one document's kNN memory sharded across the ranks of a torch.distributed group.

Every rank holds the model (weights replicated) and runs it on the same tokens, so every rank computes the same
queries; only the memory is split. Window w of a memory layer is stored by rank w % world_size (round robin), every
rank searches its shard with the same spec, and the candidates of all shards are merged in two steps: their exact
scores are all-gathered and the global top-k chosen, then the ranks holding the winners fill in their values and
one all-reduce hands them to every rank (docs/parallel.md). Since each shard returns its own exact top-k by exact
score, the top-k of their union is the top-k of the whole memory: with exact indices (exact, Flat) the output equals
the single-process output. This is Faiss's `IndexShards` merge, across processes.

    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))   # or torchrun
    doc = Document.read(model, ids, memory_spec="Flat k=32", context_parallel=True)
    doc.ask(question)        # the same answer on every rank
    doc.save("book.memory")  # each rank writes book.memory.rank{r}-of-{world_size}
    doc = Document.load("book.memory", model, context_parallel=True)   # with as many processes

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
        if found is not None:
            n = found.scores.shape[-1]
            scores[..., :n] = found.scores
            valid[..., :n] = found.valid
        # 1: every rank's candidate scores; the global top-k by exact score (rank r's candidates at r*K .. r*K+K-1)
        scores, valid = (torch.cat(self._gather(t), dim=3) for t in (scores, valid))
        top = scores.masked_fill(~valid, float("-inf")).topk(min(self.k, scores.shape[-1]), dim=-1).indices
        # 2: each rank fills in the values of the winners it holds; a sum over ranks hands every rank all of them
        values = torch.zeros(*top.shape, d, dtype=torch.float32, device=queries.device)
        if found is not None:
            held = found.values if found.values.dim() == 5 else found.values[:, :, None].expand(-1, -1, Q, -1, -1)
            mine = (top // K == self.rank) & (top % K < held.shape[3])
            slot = (top % K).clamp(max=held.shape[3] - 1)
            picked = held.gather(3, slot[..., None].expand(-1, -1, -1, -1, d)).float()
            values = picked.masked_fill(~mine[..., None], 0)
        self._collective(dist.all_reduce, values, op=dist.ReduceOp.SUM)  # one holder per slot: the sum is exact
        return MemoryLookup(scores.gather(-1, top), valid.gather(-1, top), values.to(self.local.store.dtype))

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
        """This rank's shard, with (rank, world size, windows, tokens) in "shard"."""
        state = self.local.state_dict()
        state["shard"] = torch.tensor([self.rank, self.world_size, self.windows, self.tokens], dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        shard = state.pop("shard", None)
        if shard is None or shard.dtype != torch.int64 or tuple(shard.shape) != (4,):
            raise ValueError("state holds no 'shard' (int64 rank, world size, windows, tokens): not a shard of a "
                             "context-parallel memory")
        rank, world, windows, tokens = shard.tolist()
        if (rank, world) != (self.rank, self.world_size):
            raise ValueError(f"the shard of rank {rank} of {world} processes cannot load into rank {self.rank} of "
                             f"{self.world_size}: load with {world} processes")
        if windows < 0 or tokens < 0:
            raise ValueError(f"state['shard'] holds negative counts: {shard.tolist()}")
        self.local.load_state_dict(state)
        self.windows, self.tokens = windows, tokens

    def local_windows(self) -> int:
        """How many of the windows added so far this rank stores."""
        return len(range(self.rank, self.windows, self.world_size))


def shard_path(path: str, rank: int, world_size: int) -> str:
    """The file of one rank's shard of a context-parallel memory saved as `path`."""
    return f"{path}.rank{rank}-of-{world_size}"


def current_shard_path(path: str) -> str:
    """This rank's shard file of `path`; a clear error naming the world size the shards were saved with."""
    import glob
    import os

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = shard_path(path, rank, world)
    if not os.path.exists(mine):
        others = sorted(glob.glob(glob.escape(path) + ".rank0-of-*"))
        saved = [f.rsplit("-of-", 1)[1] for f in others]
        raise ValueError(f"no shard {mine!r}" + (f"; {path!r} was saved by {' or '.join(saved)} processes: load it "
                                                  f"with that many" if saved else ""))
    return mine
