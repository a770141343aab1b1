"""Context parallelism measured: the demo reading N tokens with its memory sharded over 2 gloo processes, against
one process reading the same tokens in the same run.

    python -m experiments.bench_parallel                                       # 262144 tokens, IVF spec, ~6 min
    python -m experiments.bench_parallel --tokens 524288                       # ~12 min
    python -m experiments.bench_parallel --tokens 32768 --memory dense --layouts "round robin"

Every configuration starts fresh processes (torch.multiprocessing, forked from a server that imported the library
once; one thread each; one configuration after the other):
one process with plain memories (the reference), then `--ranks` processes with `ShardedMemory` per layout: "round
robin" (window w on rank w % N) and "contiguous" (rank r holds the r-th block of ceil(W / N) windows). Each process
reads the document's whole windows as `Document.read` does (`write_memory`, window by window) with the memory's
timers on, then runs one more window through the first memory layer and records that layer's lookups. The rows
(experiment bench_parallel): per rank, the read's wall and CPU seconds, peak RSS, keys held, and the seconds spent
adding, searching its shard, inside collectives (waiting for the slower rank included) and merging; per
configuration, the slowest rank's seconds and their ratio to one process, and the recall@k of the probe lookups
against the exact top-k over all keys (ties counted: an entry found counts when its score reaches the k-th exact score).

The document is the Austen excerpt of experiments/data, its tokens repeated to N.
"""

import argparse
import datetime
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from experiments import common

SPEC = "IVF1024,Flat k=32 nprobe=8 train=grow"
LAYOUTS = ("round robin", "contiguous")
TEXT = Path(__file__).resolve().parent / "data" / "austen_pride_and_prejudice_excerpt.txt"
METRICS = ["seconds", "x_one_process", "cpu_s", "peak_rss_mb", "memory_mb", "keys", "add_s", "search_s",
           "collective_s", "merge_s", "sent_mb", "recall"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.bench_parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[262144])
    p.add_argument("--memory", nargs="+", default=[SPEC], help="memory specs (kNN or dense)")
    p.add_argument("--ranks", type=int, default=2, help="processes sharing the memory")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--run", default=None, help="the run's label (default: its start time)")
    args = p.parse_args(argv)
    if min(args.tokens) < 1 or args.ranks < 2:
        p.error("--tokens must be positive and --ranks at least 2")
    return args


def document_ids(tokenizer, n: int) -> torch.Tensor:
    """`n` tokens of the Austen excerpt, repeated as often as needed."""
    ids = torch.tensor(tokenizer(TEXT.read_text(encoding="utf-8"))["input_ids"])
    return ids.repeat(n // len(ids) + 1)[:n]


class _Timed:
    """The reference's memory with the same add / search timers as `ShardedMemory(timed=True)`."""

    def __init__(self, memory):
        self.memory, self.seconds = memory, {"add": 0.0, "search": 0.0}
        self.k = getattr(memory, "k", None)

    def add(self, *args):
        start = time.perf_counter()
        self.memory.add(*args)
        self.seconds["add"] += time.perf_counter() - start

    def lookup(self, *args):
        start = time.perf_counter()
        found = self.memory.lookup(*args)
        self.seconds["search"] += time.perf_counter() - start
        return found


class _Probe:
    """A memory layer's memory that records the lookups of one window and adds nothing."""

    def __init__(self, memory):
        self.memory, self.calls = memory, []

    def add(self, *args):
        pass

    def lookup(self, queries, h0, h1):
        found = self.memory.lookup(queries, h0, h1)
        self.calls.append((queries, h0, found))
        return found


def _process(rank: int, world: int, layout: str, spec: str, tokens: int, port: int, out: str) -> None:
    """One process of one configuration (world 1: the reference, plain memories); writes `out`/rank{rank}.*."""
    import knn_index
    from knn_longllama.demo import load_demo
    from knn_longllama.memory import KnnMemory
    from knn_longllama.parallel import ShardedMemory

    knn_index.set_num_threads(1)
    model, tokenizer = load_demo()
    ids = document_ids(tokenizer, tokens)
    lctx, tail = model.config.max_position_embeddings, model.config.last_context_length
    stored = (tokens - tail) // lctx * lctx  # the whole windows Document.read puts in memory
    memories = {idx: model.model.new_memory(1, "cpu", spec) for idx in model.config.mem_layers}
    if world > 1:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
        block = 1 if layout == "round robin" else math.ceil(stored // lctx / world)
        memories = {idx: ShardedMemory(m, block=block, timed=True) for idx, m in memories.items()}
        dist.barrier()
    else:
        memories = {idx: _Timed(m) for idx, m in memories.items()}
    common.reset_peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    for beg in range(0, stored, lctx):
        model.model.write_memory(ids[None, beg:beg + lctx], memories)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    first = min(memories)
    probe = _Probe(memories[first])
    model.model.write_memory(ids[None, -lctx:], {first: probe})
    totals = {name: sum(m.seconds[name] for m in memories.values()) for name in ("add", "search")}
    inner = [m.local if world > 1 else m.memory for m in memories.values()]
    row = {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": common.rss_mb(), "keys": len(inner[0]),
           "memory_mb": sum(m.nbytes() for m in inner) / 2**20, "add_s": totals["add"], "search_s": totals["search"]}
    if world > 1:
        lookup, collective = (sum(m.seconds[name] for m in memories.values()) for name in ("lookup", "collective"))
        row.update(collective_s=collective, merge_s=lookup - totals["search"] - collective,
                   sent_mb=sum(m.sent_bytes for m in memories.values()) / 2**20)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(row, f)
    if rank == 0 and isinstance(inner[0], KnnMemory):  # the probe's queries and what its lookups returned
        from safetensors.torch import save_file

        flat = lambda t: t.reshape(-1, t.shape[-1]).float()  # noqa: E731  (one row per query and head)
        tensors = {"queries": torch.cat([flat(q) for q, _, _ in probe.calls]),
                   "scores": torch.cat([flat(found.scores.masked_fill(~found.valid, float("-inf")))
                                        for _, _, found in probe.calls])}
        if world == 1:  # the exact top-k scores over every key of the reference's memory
            keys = inner[0].store.entries(slice(None))[0].float()
            exact = [flat(q.float() @ keys[:, h0:h0 + q.shape[1]].transpose(-1, -2)) for q, h0, _ in probe.calls]
            tensors["exact"] = torch.cat([e.topk(min(inner[0].k, e.shape[-1]), dim=-1).values for e in exact])
        save_file(tensors, f"{out}/probe{world}.safetensors")
    if world > 1:
        dist.destroy_process_group()


def tie_aware_recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of the exact top-k matched: per query, the found scores `[..., K]` (-inf where none) that reach the
    k-th exact score (a key tied with a true neighbour counts as one), at most k."""
    kth = exact[..., -1:]
    hits = (found >= kth - 1e-4 * kth.abs().clamp(min=1)).sum(dim=-1).clamp(max=exact.shape[-1])
    return float(hits.float().mean() / exact.shape[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(tokens: int, spec: str, ranks: int, layouts: list[str]) -> list[dict]:
    """One process, then `ranks` processes per layout, reading `tokens` tokens with memory `spec`; rows."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.set_forkserver_preload(["torch", "torch.distributed", "knn_index", "knn_longllama.demo",
                               "knn_longllama.parallel"])  # imported once, by the server every process forks from

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = [("one process", 1)] + [(layout, ranks) for layout in layouts]
        for layout, world in configs:
            out = Path(tmp) / layout.replace(" ", "_")
            out.mkdir()
            mp.start_processes(_process, args=(world, layout, spec, tokens, _free_port(), str(out)), nprocs=world,
                               start_method="forkserver")
            per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
            base = {"tokens": tokens, "memory_spec": spec, "layout": layout, "ranks": world}
            for r, measured in enumerate(per_rank):
                rows.append({**base, "rank": str(r), **{k: round(v, 3) for k, v in measured.items()}})
            summary = {**base, "rank": "all", "seconds": round(max(m["seconds"] for m in per_rank), 3)}
            probe = out / f"probe{world}.safetensors"
            if probe.exists():
                found = load_file(str(probe))
                if world == 1:
                    reference = found
                else:
                    assert torch.equal(found["queries"], reference["queries"]), "the probe's queries differ"
                summary["recall"] = round(tie_aware_recall(found["scores"], reference["exact"]), 4)
            rows.append(summary)
    one = next(row["seconds"] for row in rows if row["layout"] == "one process" and row["rank"] == "all")
    for row in rows:
        if row["rank"] == "all":
            row["x_one_process"] = round(row["seconds"] / one, 3)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    env, run = common.environment("cpu", 1), common.run_id(args.run)
    for tokens in args.tokens:
        for spec in args.memory:
            rows = measure(tokens, spec, args.ranks, args.layouts)
            for row in rows:
                print(row, flush=True)
            common.append_rows("bench_parallel", rows, METRICS, run, env)


if __name__ == "__main__":
    main()
