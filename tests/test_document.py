"""Reading API and persistent memory."""

import json

import pytest
import safetensors.torch
import torch

from knn_longllama import document as document_module
from knn_longllama.document import Document

from conftest import tiny_model

BACKENDS = [dict(memory_spec="dense"), dict(memory_spec="dense", attn_implementation="sdpa"),  # fused SDPA over memory
            dict(memory_spec="Flat k=1000"), dict(memory_spec="exact k=3"), dict(memory_spec="exact k=2 block=4"),
            dict(memory_spec="Flat k=3 block=3", attn_implementation="sdpa", mem_distance=20, mem_sink_tokens=3,
                 mem_attention_grouping=(2, 5)),  # lookups per 2 heads and 5 queries
            dict(memory_spec="exact k=2 block=4 token_k=3", attn_implementation="sdpa", mem_distance=20,
                 mem_sink_tokens=3), dict(memory_spec="exact k=3", attn_implementation="sdpa", mem_distance=20)]


def backend_id(backend: dict) -> str:
    return backend["memory_spec"] + (" sdpa" if backend.get("attn_implementation") else "") + \
        (" sinks" if backend.get("mem_sink_tokens") else "")


def concatenated_generate(model, doc_ids, question_ids, steps):
    ids = torch.cat([doc_ids, question_ids], dim=1)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, do_sample=False)[:, ids.shape[1] :]


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
@pytest.mark.parametrize("doc_len", [5, 37, 100])
def test_read_then_ask_equals_generate_on_concatenated_tokens(backend, doc_len):
    model = tiny_model(mem_layers=[1], **backend)
    doc_ids = torch.randint(3, 61, (1, doc_len))
    question = torch.randint(3, 61, (1, 6))
    doc = Document.read(model, doc_ids, progress=False)
    assert doc.num_tokens == doc_len and len(doc.pending) < 16 + 8
    answer = doc.ask(question, max_new_tokens=25, do_sample=False)  # 25 > window: evictions during the answer
    assert torch.equal(answer, concatenated_generate(model, doc_ids, question, 25))


def test_questions_do_not_change_the_memory():
    model = tiny_model(mem_layers=[1])
    doc = Document.read(model, torch.randint(3, 61, (1, 90)), progress=False)
    q1, q2 = torch.randint(3, 61, (1, 5)), torch.randint(3, 61, (1, 9))
    size = len(doc.memories[1])
    alone = doc.ask(q2, max_new_tokens=30, do_sample=False)
    doc.ask(q1, max_new_tokens=30, do_sample=False)
    assert len(doc.memories[1]) == size
    assert torch.equal(doc.ask(q2, max_new_tokens=30, do_sample=False), alone)


def test_text_is_read_incrementally_from_a_file(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i + 3 for i, c in enumerate("abcdefghij \n")}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")
    text = "".join("abcdefghij \n"[i % 12] for i in range(3000))
    path = tmp_path / "doc.txt"
    path.write_text(text)
    monkeypatch.setattr(document_module, "TEXT_CHUNK_CHARS", 100)  # many pieces
    model = tiny_model(mem_layers=[1])
    from_file = Document.read(model, tokenizer=tokenizer, path=path, progress=False)
    from_ids = Document.read(model, tokenizer(text)["input_ids"], progress=False)
    from_text = Document.read(model, tokenizer=tokenizer, text=text, progress=False)
    assert from_text.pending == from_file.pending
    assert from_file.num_tokens == from_ids.num_tokens == 3000
    q = torch.randint(3, 13, (1, 4))
    assert torch.equal(from_file.ask(q, max_new_tokens=5, do_sample=False),
                       from_ids.ask(q, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
def test_save_load_ask_gives_identical_outputs(tmp_path, backend):
    model = tiny_model(mem_layers=[0, 2], **backend)
    doc = Document.read(model, torch.randint(3, 61, (1, 120)), progress=False)
    question = torch.randint(3, 61, (1, 6))
    expected = doc.ask(question, max_new_tokens=10, do_sample=False)
    doc.save(tmp_path / "doc.memory")
    loaded = Document.load(tmp_path / "doc.memory", model)
    assert loaded.num_tokens == 120 and loaded.pending == doc.pending
    assert torch.equal(loaded.ask(question, max_new_tokens=10, do_sample=False), expected)


def test_interrupted_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    model = tiny_model(mem_layers=[1])
    path = tmp_path / "doc.memory"
    Document.read(model, torch.randint(3, 61, (1, 60)), progress=False).save(path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(document_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        Document.read(model, torch.randint(3, 61, (1, 90)), progress=False).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["doc.memory"]  # no temp file left behind


def test_corrupted_truncated_mismatched_and_unknown_version_files_are_refused(tmp_path):
    model = tiny_model(mem_layers=[1])
    path = tmp_path / "doc.memory"
    Document.read(model, torch.randint(3, 61, (1, 60)), progress=False).save(path)
    data = path.read_bytes()

    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        Document.load(tmp_path / "truncated", model)

    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # inside the last tensor's data
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        Document.load(tmp_path / "flipped", model)

    with pytest.raises(ValueError, match="another model or memory configuration"):
        Document.load(path, tiny_model(seed=1, mem_layers=[1]))
    with pytest.raises(ValueError, match="another model or memory configuration"):
        Document.load(path, tiny_model(mem_layers=[1], mem_dtype="bfloat16"))

    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    manifest = json.loads(metadata["knn_longllama_manifest"])
    manifest["format_version"] = 99
    metadata["knn_longllama_manifest"] = json.dumps(manifest)
    safetensors.torch.save_file(tensors, tmp_path / "future", metadata=metadata)
    with pytest.raises(ValueError, match="format version 99"):
        Document.load(tmp_path / "future", model)

    safetensors.torch.save_file(tensors, tmp_path / "plain")
    with pytest.raises(ValueError, match="no knn_longllama manifest"):
        Document.load(tmp_path / "plain", model)
