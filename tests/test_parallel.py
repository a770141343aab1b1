"""Context parallelism: a document's kNN memory sharded over 2 and 3 gloo processes gives the single-process output."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from knn_longllama.document import Document

from conftest import tiny_model

SPECS = ["Flat k=4", "exact k=6"]


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
        model = tiny_model(mem_layers=[0, 2])
        for i, spec in enumerate(SPECS):
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
    """Exact specs, through save and load of the shards: logits within 1e-5 and the same greedy answer on every
    rank; windows spread round robin."""
    mp.spawn(_rank, args=(world, _free_port(), str(tmp_path / "out")), nprocs=world, join=True)
    doc_ids, question = _doc_and_question()
    model = tiny_model(mem_layers=[0, 2])
    for i, spec in enumerate(SPECS):
        doc = Document.read(model, doc_ids, memory_spec=spec, progress=False)
        logits, answer = _outputs(doc, question)
        shards = []
        for rank in range(world):
            got = load_file(str(tmp_path / f"out.{i}.{rank}"))
            assert (got["logits"] - logits).abs().max() <= 1e-5, (spec, rank)
            assert torch.equal(got["answer"], answer), (spec, rank)
            shards.append(int(got["shard"]))
        assert sum(shards) == len(doc.memories[0]) and max(shards) - min(shards) <= 16  # round robin windows of 16
        shard = str(tmp_path / f"out.memory{i}.rank0-of-{world}")
        with pytest.raises(ValueError, match="a shard of a context-parallel memory"):
            Document.load(shard, model)  # one process cannot load a shard as a whole memory
    if world == 3:  # shards of 3 processes are refused by 2, on every rank, with the count to use
        mp.spawn(_other_world, args=(_free_port(), str(tmp_path / "out.memory0"), str(tmp_path / "msg")), nprocs=2,
                 join=True)
        for rank in range(2):
            with open(tmp_path / f"msg.{rank}") as f:
                assert "was saved by 3 processes: load it with that many" in f.read()


def test_context_parallel_needs_an_initialised_group_and_knn_memory():
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        Document.read(tiny_model(mem_layers=[1]), torch.randint(3, 61, (1, 40)), memory_spec="Flat k=4",
                      progress=False, context_parallel=True)
    with pytest.raises(ValueError, match="kNN memory only"):
        Document.read(tiny_model(mem_layers=[1]), torch.randint(3, 61, (1, 40)), progress=False,
                      context_parallel=True)


def _dying_rank(rank, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    doc_ids, question = _doc_and_question()
    doc = Document.read(tiny_model(mem_layers=[1]), doc_ids, memory_spec="Flat k=4", progress=False,
                        context_parallel=True)
    if rank == 1:
        os._exit(3)  # dies between reading and asking
    try:
        doc.ask(question, max_new_tokens=2, do_sample=False)
        message = "no error"
    except RuntimeError as error:
        message = str(error)
    with open(out, "w") as f:
        f.write(message)


def test_a_rank_that_dies_gives_a_clear_error_not_a_hang(tmp_path):
    ctx = mp.get_context("spawn")
    port, out = _free_port(), str(tmp_path / "rank0.txt")
    ranks = [ctx.Process(target=_dying_rank, args=(rank, port, out)) for rank in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=120)
    assert not any(p.is_alive() for p in ranks)
    assert ranks[1].exitcode == 3
    with open(out) as f:
        assert f.read().startswith("context parallel: rank 0 of 2 lost its peers during a memory lookup")


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




def test_cli_reads_and_asks_with_context_parallel_under_torchrun(tmp_path):
    import shutil
    import subprocess
    import sys

    text = tmp_path / "doc.txt"
    text.write_text("The grass is green. The sky is blue.\n" * 60 + "The pass key is 4242. Remember it.\n"
                    + "The sun is yellow. Here we go.\n" * 60)
    memory = tmp_path / "doc.memory"
    question = ["What is the pass key? The pass key is", "--max-new-tokens", "4", "--threads", "1"]
    cli = [sys.executable, "-m", "knn_longllama.cli"]
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
    whole = tmp_path / "whole.memory"
    assert run(cli + ["read", str(text), "-o", str(whole), "--memory", "Flat k=16", "--quiet"]).returncode == 0
    single = run(cli + ["ask", str(whole), *question])
    assert sharded.stdout == single.stdout and single.stdout.strip() != ""
