"""Context parallelism: a document's memory (kNN or dense) sharded over 2 and 3 gloo processes gives the
single-process output."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from knn_longllama.document import Document
from knn_longllama.memory import MemoryLookup, OverlayMemory, SoftmaxPart
from knn_longllama.parallel import ShardedMemory

from conftest import tiny_model

# Ranks start from a fork server that imported torch and the library once (a spawned process would import them
# again, several seconds each); the server itself never ran torch, so forking it is safe.
START = "forkserver"
mp.set_forkserver_preload(["torch", "torch.distributed", "knn_index", "knn_longllama.document"])

# (memory spec, model settings): exact kNN indices, and dense memory merged by softmax statistics, also with grouped
# KV heads and attention chunked by mem_attention_grouping (several lookups per window)
CASES = [("Flat k=4", {}), ("exact k=6", {}), ("dense", {}),
         ("dense", dict(num_key_value_heads=2, mem_attention_grouping=(2, 3)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _doc_and_question():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(3, 61, (1, 300), generator=gen), torch.randint(3, 61, (1, 5), generator=gen)


def _outputs(doc, question):
    """Logits of the pending tokens + question over the document's memory, and a greedy answer."""
    ids = torch.cat([torch.tensor([doc.pending]), question], dim=1)
    with torch.no_grad():
        logits = doc.model(ids, cache=doc.new_cache(), use_cache=True).logits
    return logits, doc.ask(question, max_new_tokens=12, do_sample=False)


def _rank(rank, world, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        doc_ids, question = _doc_and_question()
        for i, (spec, settings) in enumerate(CASES):
            model = tiny_model(mem_layers=[0, 2], **settings)
            doc = Document.read(model, doc_ids, memory_spec=spec, progress=False, context_parallel=True)
            doc.save(f"{out}.memory{i}")  # each rank its shard; loaded back by the same ranks
            doc = Document.load(f"{out}.memory{i}", model, context_parallel=True)
            logits, answer = _outputs(doc, question)
            shard = len(doc.memories[0].local)
            save_file({"logits": logits, "answer": answer, "shard": torch.tensor([shard])}, f"{out}.{i}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_memory_equals_one_process(tmp_path, world):
    """Exact kNN specs and dense memory, through save and load of the shards: logits within 1e-5 and the same
    greedy answer on every rank; windows spread round robin."""
    mp.start_processes(_rank, args=(world, _free_port(), str(tmp_path / "out")), nprocs=world, start_method=START)
    doc_ids, question = _doc_and_question()
    for i, (spec, settings) in enumerate(CASES):
        model = tiny_model(mem_layers=[0, 2], **settings)
        doc = Document.read(model, doc_ids, memory_spec=spec, progress=False)
        logits, answer = _outputs(doc, question)
        shards = []
        for rank in range(world):
            got = load_file(str(tmp_path / f"out.{i}.{rank}"))
            assert (got["logits"] - logits).abs().max() <= 1e-5, (spec, settings, rank)
            assert torch.equal(got["answer"], answer), (spec, rank)
            shards.append(int(got["shard"]))
        assert sum(shards) == len(doc.memories[0]) and max(shards) - min(shards) <= 16  # round robin windows of 16
        shard = str(tmp_path / f"out.memory{i}.rank0-of-{world}")
        with pytest.raises(ValueError, match="a shard of a context-parallel memory"):
            Document.load(shard, model)  # one process cannot load a shard as a whole memory
    if world == 3:  # shards of 3 processes are refused by 2, on every rank, with the count to use
        mp.start_processes(_other_world, args=(_free_port(), str(tmp_path / "out.memory0"), str(tmp_path / "msg")),
                           nprocs=2, start_method=START)
        for rank in range(2):
            with open(tmp_path / f"msg.{rank}") as f:
                assert "was saved by 3 processes: load it with that many" in f.read()


def test_softmax_parts_merged_and_joined_with_local_scores_equal_one_softmax():
    """Memory entries split in three parts (one empty, one with invalid entries and scores below the floor), merged
    by log-sum-exp and joined with the local logits: one softmax over everything, written out here."""
    gen = torch.Generator().manual_seed(0)
    B, h, Q, d, scale, floor = 2, 3, 5, 8, 0.3, -1e6
    q = torch.randn(B, h, Q, d, generator=gen)
    local, local_v = torch.randn(B, h, Q, 7, generator=gen), torch.randn(B, h, 7, d, generator=gen)
    local[..., 0] = floor  # a masked local key
    keys, values = torch.randn(B, h, 9, d, generator=gen) * 3, torch.randn(B, h, 9, d, generator=gen)
    valid = torch.rand(B, 1, 1, 9, generator=gen) > 0.3
    scores = q @ keys.transpose(-1, -2)
    scores[..., 4] = -1e9  # clamped at the floor
    parts = [SoftmaxPart(torch.full((B, h, Q), floor), torch.zeros(B, h, Q), torch.zeros(B, h, Q, d), scale, floor)]
    for cut in (slice(0, 4), slice(4, 9)):
        parts.append(SoftmaxPart.of(MemoryLookup(scores[..., cut], valid[..., cut], values[:, :, cut]), scale, floor))
    merged = parts[0].merge(parts[1]).merge(parts[2])
    logits = torch.cat([local, (scores * scale).masked_fill(~valid, floor)], dim=-1).clamp(min=floor)
    expected = torch.softmax(logits.double(), dim=-1) @ torch.cat([local_v, values], dim=2).double()
    torch.testing.assert_close(merged.attend(local, local_v).double(), expected, rtol=1e-5, atol=1e-6)


def test_context_parallel_needs_an_initialised_group_a_memory_and_a_positive_block():
    for spec in ("Flat k=4", "dense"):
        with pytest.raises(ValueError, match="torch.distributed initialised"):
            Document.read(tiny_model(mem_layers=[1]), torch.randint(3, 61, (1, 40)), memory_spec=spec,
                          progress=False, context_parallel=True)
    memory = tiny_model(mem_layers=[1]).model.new_memory(1, "cpu", "dense")
    with pytest.raises(ValueError, match="shards KnnMemory or DenseMemory, got OverlayMemory"):
        ShardedMemory(OverlayMemory(memory))
    for block in (0, 1.5, True):
        with pytest.raises(ValueError, match="block must be a positive int"):
            ShardedMemory(memory, block=block)


TIMEOUT_S = 6  # the group's timeout in the fault tests


def _faulty_rank(rank, world, fault, spec, port, out):
    """Rank world-1 dies (`fault` "dies") or stalls past the timeout ("stalls") between reading and asking; every
    other rank asks and writes what happened, and how long it took, to `out`.rank."""
    import time

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    doc_ids, question = _doc_and_question()
    doc = Document.read(tiny_model(mem_layers=[1]), doc_ids, memory_spec=spec, progress=False, context_parallel=True)
    if rank == world - 1:
        if fault == "stalls":
            time.sleep(600)  # until the test ends it
        os._exit(3)
    start = time.monotonic()
    try:
        doc.ask(question, max_new_tokens=2, do_sample=False)
        message = "no error"
    except RuntimeError as error:
        message = str(error)
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{time.monotonic() - start:.1f}\n{message}")
    os._exit(0)


@pytest.mark.parametrize("fault, spec", [("dies", "Flat k=4"), ("stalls", "dense")])
def test_a_rank_that_dies_or_stalls_gives_every_other_rank_a_clear_error_within_the_timeout(tmp_path, fault, spec):
    ctx, world = mp.get_context(START), 3
    port, out = _free_port(), str(tmp_path / "rank")
    ranks = [ctx.Process(target=_faulty_rank, args=(rank, world, fault, spec, port, out)) for rank in range(world)]
    for p in ranks:
        p.start()
    for p in ranks[:-1]:
        p.join(timeout=120)
    faulty = ranks[-1]
    faulty.join(timeout=0 if fault == "stalls" else 120)
    if faulty.is_alive():
        faulty.kill()
        faulty.join()
    assert [p.exitcode for p in ranks[:-1]] == [0, 0]
    for rank in range(world - 1):
        with open(f"{out}.{rank}") as f:
            seconds, message = f.read().split("\n", 1)
        assert message.startswith(f"context parallel: rank {rank} of 3 lost its peers during a memory lookup"), message
        assert float(seconds) < 3 * TIMEOUT_S  # bounded by the timeout, not by the stalled rank


def _other_world(rank, port, path, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        Document.load(path, tiny_model(mem_layers=[0, 2]), context_parallel=True)
        message = "loaded"
    except ValueError as error:
        message = str(error)
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(message)


def test_cli_reads_and_asks_with_context_parallel_under_torchrun(tmp_path, capsys):
    import shutil
    import subprocess

    from knn_longllama import cli

    text = tmp_path / "doc.txt"
    text.write_text("The grass is green. The sky is blue.\n" * 60 + "The pass key is 4242. Remember it.\n"
                    + "The sun is yellow. Here we go.\n" * 60)
    memory = tmp_path / "doc.memory"
    question = ["What is the pass key? The pass key is", "--max-new-tokens", "4", "--threads", "1"]
    torchrun = [shutil.which("torchrun") or "torchrun", "--nproc-per-node", "2", "--master-port", str(_free_port()),
                "-m", "knn_longllama.cli"]
    run = lambda args: subprocess.run(args, capture_output=True, text=True, timeout=300)  # noqa: E731
    read = run(torchrun + ["read", str(text), "-o", str(memory), "--memory", "Flat k=16", "--quiet", "--threads", "1",
                           "--context-parallel"])
    assert read.returncode == 0, read.stderr[-2000:]
    assert read.stdout.count("tokens into") == 1  # rank 0 prints
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("doc.memory")) == [
        "doc.memory.rank0-of-2", "doc.memory.rank1-of-2"]
    sharded = run(torchrun + ["ask", str(memory), *question, "--context-parallel"])
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    whole = tmp_path / "whole.memory"  # one process, in this one
    assert cli.main(["read", str(text), "-o", str(whole), "--memory", "Flat k=16", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["ask", str(whole), *question]) == 0
    single = capsys.readouterr().out
    assert sharded.stdout == single and single.strip() != ""
