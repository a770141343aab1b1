"""Context parallelism: one document's memory sharded across the ranks of a torch.distributed group.

Every rank holds the model (weights replicated) and runs it on the same tokens, so every rank computes the same
queries; only the memory is split. Window w of a memory layer is stored by rank w % world_size (round robin; or in
blocks of `block` windows, rank (w // block) % world_size), and every rank looks the queries up in its shard.

- kNN memory: every rank searches its shard with the same spec, and the candidates of all shards are merged in two
  steps: their exact scores are all-gathered and the global top-k chosen, then the ranks holding the winners fill in
  their values and one all-reduce hands them to every rank. Since each shard returns its own exact top-k by exact
  score, the top-k of their union is the top-k of the whole memory: with exact indices (exact, Flat) the output
  equals the single-process output. This is Faiss's `IndexShards` merge, across processes.
- Dense memory: every rank reduces its shard to softmax statistics per query (max logit, sum of exponentials,
  exp-weighted value sum; `SoftmaxPart`), the ranks combine them with two all-reduces (the max, then the rescaled
  sums), and attention joins them with the local scores in one softmax: the single-process output up to rounding.

    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))   # or torchrun
    doc = Document.read(model, ids, memory_spec="Flat k=32", context_parallel=True)
    doc.ask(question)        # the same answer on every rank
    doc.save("book.memory")  # each rank writes book.memory.rank{r}-of-{world_size}
    doc = Document.load("book.memory", model, context_parallel=True)   # with as many processes

See docs/parallel.md for the cost of the merges and the measurements.
"""

import math
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .memory import DenseMemory, KnnMemory, MemoryLookup, SoftmaxPart
from .modeling_longllama import score_floor

TIMERS = ("add", "search", "collective", "lookup")


class ShardedMemory:
    """A `KnnMemory` or `DenseMemory` holding this rank's share of the windows of one memory layer; lookups merge
    all ranks' shares.

    block: windows per block of the assignment (rank (w // block) % world_size stores window w); 1 is round robin.
    timed: accumulate wall seconds in `seconds` (`add`; the local `search` of the shard, for dense memory its softmax
    statistics; time inside `collective` calls, waiting for the other ranks included; the whole `lookup`) and the
    bytes this rank hands to collectives in `sent_bytes`; off by default.
    """

    def __init__(self, local: KnnMemory | DenseMemory, group=None, *, block: int = 1, timed: bool = False):
        if not isinstance(local, (KnnMemory, DenseMemory)):
            raise ValueError(f"context_parallel shards KnnMemory or DenseMemory, got {type(local).__name__}")
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ValueError(f"block must be a positive int (windows per block; 1 is round robin), got {block!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("context_parallel needs torch.distributed initialised (torchrun, or "
                             "torch.distributed.init_process_group)")
        self.local, self.group, self.block, self.dtype = local, group, block, local.dtype
        self.k = getattr(local, "k", None)  # None: every entry counts (dense), as for an unsharded memory
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.windows = 0  # windows added so far, on every rank alike
        self.tokens = 0  # real tokens in the whole (all-rank) memory, largest row
        self.seconds = dict.fromkeys(TIMERS, 0.0) if timed else None
        self.sent_bytes = 0

    def owner(self, window: int) -> int:
        """The rank that stores window number `window`."""
        return window // self.block % self.world_size

    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        if self.owner(self.windows) == self.rank:
            with self._timer("add", keys):
                self.local.add(keys, values, mask)
        self.windows += 1
        self.tokens += int(mask.sum(dim=1).max())

    def lookup(self, queries: torch.Tensor, h0: int, h1: int) -> MemoryLookup | SoftmaxPart | None:
        if self.tokens == 0:
            return None
        with self._timer("lookup", queries):
            if isinstance(self.local, DenseMemory):
                with self._timer("search", queries):
                    part = self._statistics(queries, self.local.lookup(queries, h0, h1))
                return self._merge_statistics(part)
            with self._timer("search", queries):
                found = self.local.lookup(queries, h0, h1)
            return self._merge_candidates(queries, found)

    @staticmethod
    def _statistics(queries: torch.Tensor, found: MemoryLookup | None) -> SoftmaxPart:
        """Dense: this shard's softmax statistics for `queries` (the attention's scale and floor)."""
        scale, floor = 1.0 / math.sqrt(queries.shape[-1]), score_floor(queries.dtype)
        if found is not None:
            return SoftmaxPart.of(found, scale, floor)
        shape = queries.shape[:3]  # no window here yet: no entries, zero sums
        return SoftmaxPart(queries.new_full(shape, floor, dtype=torch.float32), queries.new_zeros(shape,
                           dtype=torch.float32), queries.new_zeros(queries.shape, dtype=torch.float32), scale, floor)

    def _merge_statistics(self, part: SoftmaxPart) -> SoftmaxPart:
        """Dense: every rank's softmax statistics, combined (log-sum-exp) into those of the whole memory."""
        top = part.max.clone()
        self._collective(dist.all_reduce, top, op=dist.ReduceOp.MAX)
        total, weighted = part.rescaled(top)
        sums = torch.cat([total[..., None], weighted], dim=-1)  # one all-reduce for both sums
        self._collective(dist.all_reduce, sums, op=dist.ReduceOp.SUM)
        return SoftmaxPart(top, sums[..., 0], sums[..., 1:], part.scale, part.floor)

    def _merge_candidates(self, queries: torch.Tensor, found: MemoryLookup | None) -> MemoryLookup:
        """kNN: the global top-k of every rank's candidates by exact score, with their values."""
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
        sent = args[-1] if collective is dist.all_gather else args[0]
        self.sent_bytes += sent.numel() * sent.element_size()
        try:
            with self._timer("collective", sent):
                collective(*args, group=self.group, **kwargs)
        except RuntimeError as error:  # a rank died or timed out: the same clear error on every surviving rank
            raise RuntimeError(f"context parallel: rank {self.rank} of {self.world_size} lost its peers during a "
                               f"memory lookup ({str(error).splitlines()[0]})") from None

    @contextmanager
    def _timer(self, name: str, tensor: torch.Tensor):
        if self.seconds is None:
            yield
            return
        sync = torch.cuda.synchronize if tensor.is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.seconds[name] += time.perf_counter() - start

    def __len__(self) -> int:
        return self.tokens

    def nbytes(self) -> int:
        return self.local.nbytes()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's shard, with (rank, world size, windows, tokens, block) in "shard"."""
        state = self.local.state_dict()
        state["shard"] = torch.tensor([self.rank, self.world_size, self.windows, self.tokens, self.block],
                                      dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        shard = state.pop("shard", None)
        if shard is None or shard.dtype != torch.int64 or tuple(shard.shape) != (5,):
            raise ValueError("state holds no 'shard' (int64 rank, world size, windows, tokens, block): not a shard "
                             "of a context-parallel memory")
        rank, world, windows, tokens, block = shard.tolist()
        if (rank, world) != (self.rank, self.world_size):
            raise ValueError(f"the shard of rank {rank} of {world} processes cannot load into rank {self.rank} of "
                             f"{self.world_size}: load with {world} processes")
        if windows < 0 or tokens < 0 or block < 1:
            raise ValueError(f"state['shard'] holds a negative count or a block below 1: {shard.tolist()}")
        self.local.load_state_dict(state)
        self.windows, self.tokens, self.block = windows, tokens, block

    def local_windows(self) -> int:
        """How many of the windows added so far this rank stores."""
        return sum(self.owner(w) == self.rank for w in range(self.windows))


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
