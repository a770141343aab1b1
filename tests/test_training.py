"""FoT cross-batch training (docs/semantics.md, "FoT cross-batch training"): packing, schedules, and a toy model that learns to use its memory."""

import itertools
import random

import pytest
import torch

from knn_longllama import LongLlamaForCausalLM
from knn_longllama.training import (
    IGNORE_INDEX, TrainingConfig, crossbatch_contexts_at, crossbatch_loss, evaluate_loss, lr_at, pack_crossbatch,
    train,
)

from conftest import tiny_config


# ------------------------------------------------------------------------------------------------------- packing


def test_pack_rows_are_consecutive_chunks_of_each_stream():
    streams = [list(range(100, 112)), list(range(200, 212)), list(range(300, 312)), list(range(400, 412))]
    batches = list(pack_crossbatch(streams, chunk_len=4, chunks_per_stream=3, streams_per_batch=2))
    assert len(batches) == 2
    first = batches[0]
    assert first["input_ids"].shape == (6, 4)
    expected = torch.tensor([list(range(s, s + 12)) for s in (100, 200)]).view(6, 4)
    assert torch.equal(first["input_ids"], expected)  # rows k*n .. k*n+k-1 = chunks 0..k-1 of stream n
    assert torch.equal(batches[1]["input_ids"][3], torch.tensor([400, 401, 402, 403]))
    assert first["attention_mask"].all()
    assert torch.equal(first["labels"], first["input_ids"])
    assert "loss_weights" not in first


def test_pack_long_streams_split_and_short_streams_padded():
    streams = [list(range(1, 11)), [7, 8, 9]]  # 10 tokens -> groups of 8 + 2; 3 tokens -> 1 group
    batches = list(pack_crossbatch(streams, chunk_len=4, chunks_per_stream=2, streams_per_batch=3, pad_token_id=0,
                                   drop_last=False))
    assert len(batches) == 1
    ids, mask, labels = batches[0]["input_ids"], batches[0]["attention_mask"], batches[0]["labels"]
    assert ids.shape == (6, 4)
    assert ids[:2].flatten().tolist() == list(range(1, 9))
    assert ids[2:4].flatten().tolist() == [9, 10, 0, 0, 0, 0, 0, 0]
    assert mask[2:4].flatten().tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert labels[2:4].flatten().tolist() == [9, 10] + [IGNORE_INDEX] * 6
    assert ids[4:6].flatten().tolist() == [7, 8, 9, 0, 0, 0, 0, 0]
    # an incomplete final batch is dropped by default
    assert list(pack_crossbatch(streams, chunk_len=4, chunks_per_stream=2, streams_per_batch=4)) == []


def test_pack_carries_loss_weights():
    streams = [dict(input_ids=[5, 6, 7, 8], loss_weights=[1.0, 1.0, 5.0, 5.0]), [9, 9, 9]]
    (batch,) = pack_crossbatch(streams, chunk_len=2, chunks_per_stream=2, streams_per_batch=2)
    assert batch["loss_weights"].tolist() == [[1.0, 1.0], [5.0, 5.0], [1.0, 1.0], [1.0, 0.0]]
    with pytest.raises(ValueError):
        next(pack_crossbatch([dict(input_ids=[1, 2], loss_weights=[1.0])], 2, 1, 1))


def test_context_and_lr_schedules():
    assert [crossbatch_contexts_at(s, 3, 7, 10, 20) for s in (0, 10, 15, 19, 20, 100)] == [3, 3, 5, 6, 7, 7]
    config = TrainingConfig(max_steps=100, chunks_per_stream=4, contexts_ramp=(0.5, 0.75))
    assert config.contexts_at(0) == 3 and config.contexts_at(50) == 3 and config.contexts_at(99) == 7
    assert lr_at(0, 1.0, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_at(10, 1.0, 10, 100, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_at(60, 1.0, 10, 100, "constant", 0.1) == 1.0


# ------------------------------------------------------------------------------------------------ toy training


def lookup_streams(seed: int, chunk: int = 16):
    """Two-chunk streams for a lookup whose answer is only in the previous chunk: chunk 0 repeats a token `a`
    (3..30), chunk 1 is noise (31..60) ending with `a`. Only that last token is scored (loss weight 1, others 0), so
    without memory it is a guess among 28 tokens, with cross-batch memory of chunk 0 it is a copy."""
    rng = random.Random(seed)
    while True:
        a = rng.randrange(3, 31)
        noise = [rng.randrange(31, 61) for _ in range(chunk - 1)]
        yield dict(input_ids=[a] * chunk + noise + [a], loss_weights=[0.0] * (2 * chunk - 1) + [1.0])


def toy_batches(seed: int):
    return pack_crossbatch(lookup_streams(seed), chunk_len=16, chunks_per_stream=2, streams_per_batch=8)


def test_fot_training_learns_to_use_memory(tmp_path):
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest (and robust on a busy machine)
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(tiny_config(mem_layers=[1], max_position_embeddings=16, last_context_length=16))
    config = TrainingConfig(max_steps=120, lr=1e-2, warmup_steps=10, chunks_per_stream=2, contexts_start=1,
                            contexts_end=1, seed=0, progress=False, output_dir=str(tmp_path / "ckpt"))
    history = train(model, toy_batches(seed=0), config)
    assert len(history) == 120
    first = sum(h["loss"] for h in history[:10]) / 10
    last = sum(h["loss"] for h in history[-10:]) / 10
    assert first > 3.0 and last < first - 2.0, (first, last)

    held_out = list(itertools.islice(toy_batches(seed=1), 8))
    with_memory = evaluate_loss(model, held_out, contexts=1)
    without_memory = evaluate_loss(model, held_out, contexts=0)
    # the answer is only in the previous chunk of the same stream: without memory the model can only guess
    assert with_memory < 1.5 and without_memory > with_memory + 2.0, (with_memory, without_memory)

    # the checkpoint reloads to the same model (continued pretraining starts from it)
    reloaded = LongLlamaForCausalLM.from_pretrained(str(tmp_path / "ckpt")).eval()
    with torch.no_grad():
        assert crossbatch_loss(reloaded, held_out[0], 1).item() == pytest.approx(
            crossbatch_loss(model.eval(), held_out[0], 1).item(), abs=1e-5
        )


def test_continued_pretraining_of_a_loaded_checkpoint(tmp_path):
    torch.manual_seed(0)
    LongLlamaForCausalLM(tiny_config(max_position_embeddings=16, last_context_length=16)).save_pretrained(tmp_path)
    model = LongLlamaForCausalLM.from_pretrained(str(tmp_path))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    held_out = list(itertools.islice(toy_batches(seed=1), 4))
    loss_before = evaluate_loss(model, held_out, contexts=1)
    config = TrainingConfig(max_steps=30, lr=1e-2, warmup_steps=3, chunks_per_stream=2, progress=False)
    history = train(model, toy_batches(seed=0), config)
    assert [h["contexts"] for h in history][:9] == [1] * 9 and history[-1]["contexts"] == 3  # E rises 1 -> 3
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert evaluate_loss(model, held_out, contexts=1) < loss_before


def test_training_is_seeded():
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = LongLlamaForCausalLM(tiny_config(max_position_embeddings=16, last_context_length=16))
        config = TrainingConfig(max_steps=5, lr=1e-2, warmup_steps=1, chunks_per_stream=2, progress=False, seed=3)
        losses.append([h["loss"] for h in train(model, toy_batches(seed=0), config)])
    assert losses[0] == losses[1]


def test_loss_weights_weight_the_tokens():
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(tiny_config(max_position_embeddings=16, last_context_length=16)).eval()
    batch = {key: value for key, value in next(toy_batches(seed=0)).items() if key != "loss_weights"}
    plain = crossbatch_loss(model, batch, 1)
    ones = crossbatch_loss(model, dict(batch, loss_weights=torch.ones(batch["input_ids"].shape)), 1)
    assert ones.item() == pytest.approx(plain.item(), rel=1e-5)
    only_last = torch.zeros(batch["input_ids"].shape)
    only_last[:, -1] = 1.0
    weighted = crossbatch_loss(model, dict(batch, loss_weights=only_last), 1)
    with torch.no_grad():
        logits = model(batch["input_ids"], use_cache=False, crossbatch_contexts=1).logits
    expected = torch.nn.functional.cross_entropy(logits[:, -2].float(), batch["labels"][:, -1])
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)


def test_time_budget_and_running_out_of_batches_stop_training():
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(tiny_config(max_position_embeddings=16, last_context_length=16))
    config = TrainingConfig(max_steps=50, chunks_per_stream=2, progress=False, max_seconds=0.0)
    assert len(train(model, toy_batches(seed=0), config)) == 1
    config = TrainingConfig(max_steps=50, chunks_per_stream=2, progress=False)
    assert len(train(model, itertools.islice(toy_batches(seed=0), 3), config)) == 3
    assert not model.training
