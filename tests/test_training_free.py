"""Training-free reading (docs/semantics.md#training-free): memory at a fixed RoPE distance and attention sinks,
against the brute-force reference of test_model_reference.py extended by the two rules."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError

from conftest import tiny_model
from test_model_reference import ReferenceRow, assert_close_on_real, left_padded_batch

from knn_longllama import Document
from knn_longllama.memory import KnnMemory, SinkMemory


class TrainingFreeRow(ReferenceRow):
    """The reference with `mem_distance` (memory scored by the un-rotated query turned by that distance) and, for a
    top-k memory, the first `mem_sink_tokens` memory entries always attended beside the top-k of the others."""

    def __init__(self, model, mem_dtype, k=None):
        super().__init__(model, mem_dtype)
        self.k = k

    def memory_scores(self, layer, kv_head, q_raw, q_rot):
        cfg = self.cfg
        query = q_rot if cfg.mem_distance is None else self.rotate(q_raw, cfg.mem_distance)
        keys = torch.stack([km[kv_head] for km, _ in self.memory[layer]])
        values = torch.stack([vm[kv_head] for _, vm in self.memory[layer]])
        scores = keys @ query
        if self.k is None:  # dense: every entry, sinks included
            return scores, values
        n = min(cfg.mem_sink_tokens, len(scores))
        rest = scores[n:]
        pick = torch.cat([torch.arange(n), n + rest.topk(min(self.k, len(rest))).indices])
        return scores[pick], values[pick]


def reference(model, ids, mask, use_cache, last_context_length, k=None):
    rows = [TrainingFreeRow(model, torch.float32, k) for _ in range(ids.shape[0])]
    return torch.stack([row.feed(ids[b].tolist(), mask[b].tolist(), use_cache, last_context_length)
                        for b, row in enumerate(rows)])


CASES = [  # (mem_distance, mem_sink_tokens, memory_spec, reference k)
    (11, 0, "dense", None), (0, 0, "dense", None), (40, 5, "dense", None),
    (None, 5, "exact k=3", 3), (11, 5, "exact k=3", 3), (11, 20, "exact k=4", 4), (7, 3, "Flat k=2", 2),
]


@pytest.mark.parametrize("distance, sinks, spec, k", CASES)
@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_forward_matches_reference(distance, sinks, spec, k, use_cache, attn):
    """sdpa: fused local attention joined with the memory part by log-sum-exp (`_attend_parts`) for top-k memories."""
    model = tiny_model(seed=3, num_key_value_heads=2, mem_distance=distance, mem_sink_tokens=sinks,
                       memory_spec=spec, mem_layers=[1, 2], attn_implementation=attn)
    ids, mask = left_padded_batch(57, pad=9, vocab=model.config.vocab_size)  # row 1's sinks span two windows
    out = model(ids, attention_mask=mask, use_cache=use_cache, last_context_length=8).logits
    assert_close_on_real(out, reference(model, ids, mask, use_cache, 8, k), mask, 2e-4)


@pytest.mark.parametrize("distance, sinks", [(11, 0), (40, 5)])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_sdpa_with_dense_memory_at_a_distance_matches_reference(distance, sinks, kv_heads):
    """Dense memory with `mem_distance` offers the same entries to every query: sdpa attends to them with a fused
    call of their own, joined with the local keys' through the log-sum-exps (`_attend_parts`)."""
    model = tiny_model(seed=3, num_key_value_heads=kv_heads, mem_distance=distance, mem_sink_tokens=sinks,
                       memory_spec="dense", mem_layers=[1, 2], attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    ids, mask = left_padded_batch(57, pad=9, vocab=model.config.vocab_size)
    for use_cache in (False, True):
        out = model(ids, attention_mask=mask, use_cache=use_cache, last_context_length=8).logits
        assert_close_on_real(out, reference(model, ids, mask, use_cache, 8), mask, 2e-4)


@pytest.mark.parametrize("spec, distance, sinks", [("exact k=2 block=4", 12, 3), ("exact k=2 block=4", None, 0),
                                                   ("Flat k=3 block=3", 7, 5), ("exact k=2 block=4 token_k=3", 12, 3),
                                                   ("exact k=3", 11, 5)])
@pytest.mark.parametrize("kv_heads, grouping", [(1, None), (2, None), (4, None), (2, (2, 5)), (2, (4, 3))])
def test_sdpa_with_block_memory_equals_eager(spec, distance, sinks, kv_heads, grouping):
    """Retrieval under sdpa (fused parts joined by log-sum-exp) computes what the eager path computes (whose
    lookups are checked against brute force below and in test_forward_matches_reference): forward with and without
    cache, then token-by-token generation through evictions. Blocks, blocks with per-query token_k, top-k tokens."""
    ids, mask = left_padded_batch(57, pad=9, vocab=61)
    outputs = {}
    for attn in ("eager", "sdpa"):
        model = tiny_model(seed=3, num_key_value_heads=kv_heads, mem_distance=distance, mem_sink_tokens=sinks,
                           memory_spec=spec, mem_layers=[1, 2], attn_implementation=attn,
                           mem_attention_grouping=grouping)  # a lookup per chunk of (heads, queries)
        runs = [model(ids, attention_mask=mask, use_cache=use_cache, last_context_length=8).logits
                for use_cache in (False, True)]
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                   last_context_length=8, output_logits=True, return_dict_in_generate=True))
        outputs[attn] = runs
    for eager, sdpa in zip(outputs["eager"][:2], outputs["sdpa"][:2]):
        assert_close_on_real(sdpa, eager.double(), mask, 1e-5)
    eager, sdpa = outputs["eager"][2], outputs["sdpa"][2]
    assert torch.equal(eager.sequences, sdpa.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(eager.logits, sdpa.logits)) < 1e-4


def test_softmax_part_of_fused_attention_against_a_written_out_softmax():
    """`SoftmaxPart.attention`: the fused CPU kernel (float32, bfloat16) and the plain float32 fallback (float64 input) against
    softmax(q k^T * scale + bias) v, with blocked entries and a row whose entries are all blocked."""
    from knn_longllama.memory import SoftmaxPart

    torch.manual_seed(0)
    B, h, Q, K, d, scale, floor = 2, 3, 7, 11, 16, 0.25, -1e6
    q, k, v = torch.randn(B, h, Q, d), torch.randn(B, h, K, d), torch.randn(B, h, K, d)
    blocked = torch.rand(B, 1, Q, K) < 0.3
    blocked[1, 0, 2] = True
    bias = torch.zeros(B, 1, Q, K).masked_fill_(blocked, floor)
    want = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale + bias.double(), dim=-1) @ v.double()
    seen = ~blocked.all(-1, keepdim=True).expand(B, h, Q, d)  # a fully blocked query's output is only finite
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-5), (torch.bfloat16, 5e-2)):
        part = SoftmaxPart.attention(q.to(dtype), k.to(dtype), v.to(dtype), bias, scale, floor)
        assert part.output().dtype == torch.float32 or dtype == torch.float64
        assert torch.isfinite(part.output()).all()
        assert (part.output().double() - want)[seen].abs().max() < tol, dtype
    halves = [SoftmaxPart.attention(q, k[:, :, cut], v[:, :, cut], bias[..., cut], scale, floor)
              for cut in (slice(0, 5), slice(5, K))]
    merged = halves[0].merge(halves[1]).output()
    assert torch.isfinite(merged).all()
    assert (merged.double() - want)[seen].abs().max() < 1e-5
    # gradients (training): the kernel's log-sum-exp has none, so the parts must come from differentiable matmuls
    weights = torch.randn(B, h, Q, d, dtype=torch.float64)
    q64 = q.double().requires_grad_()
    ref = torch.softmax((q64 @ k.double().transpose(-1, -2)) * scale + bias.double(), dim=-1) @ v.double()
    (want_grad,) = torch.autograd.grad((ref * weights)[seen].sum(), q64)
    q32 = q.clone().requires_grad_()
    halves = [SoftmaxPart.attention(q32, k[:, :, cut], v[:, :, cut], bias[..., cut], scale, floor)
              for cut in (slice(0, 5), slice(5, K))]
    (grad,) = torch.autograd.grad((halves[0].merge(halves[1]).output() * weights)[seen].sum(), q32)
    assert (grad.double() - want_grad).abs().max() < 1e-4


def test_generation_evicts_through_sinks():
    """Chunks and single tokens through the cache: evictions move windows into the sinks and the searched base."""
    model = tiny_model(seed=4, num_key_value_heads=2, mem_distance=9, mem_sink_tokens=6, memory_spec="exact k=2")
    ids, mask = left_padded_batch(50, pad=5, vocab=model.config.vocab_size, seed=2)
    rows = [TrainingFreeRow(model, torch.float32, k=2) for _ in range(2)]
    cache = None
    for beg, end in [(0, 3), (3, 9), (9, 30), *[(i, i + 1) for i in range(30, 50)]]:
        with torch.no_grad():
            out = model(ids[:, beg:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
        cache = out.cache
        expected = torch.stack([row.feed(ids[b, beg:end].tolist(), mask[b, beg:end].tolist(), True, 8)
                                for b, row in enumerate(rows)])
        assert_close_on_real(out.logits, expected, mask[:, beg:end], 2e-4)
    assert cache.memories[1].taken.tolist() == [6, 6]


def test_defaults_leave_the_official_semantics():
    config = tiny_model().config
    assert config.mem_distance is None and config.mem_sink_tokens == 0
    assert not isinstance(tiny_model().model.new_memory(1, "cpu"), SinkMemory)


def test_sinks_change_what_a_top_k_memory_sees():
    """With few neighbours, keeping the first tokens changes the output; with dense memory it changes nothing."""
    ids, mask = left_padded_batch(48, pad=0, vocab=61, seed=5)
    runs = {}
    for spec in ("dense", "exact k=1"):
        for sinks in (0, 6):
            model = tiny_model(seed=6, memory_spec=spec, mem_sink_tokens=sinks)
            runs[spec, sinks] = model(ids, use_cache=False).logits
    assert torch.allclose(runs["dense", 0], runs["dense", 6], atol=1e-5)
    assert (runs["exact k=1", 0] - runs["exact k=1", 6]).abs().max() > 1e-3


def test_sink_memory_lookup_against_brute_force():
    """SinkMemory(KnnMemory): the first n real tokens of each row plus the exact top-k of the rest, per query."""
    torch.manual_seed(0)
    n, k, H, d = 4, 3, 2, 8
    memory = SinkMemory(KnnMemory(2, H, d, "exact k=3", dtype=torch.float32, device="cpu"), n)
    stored = [[], []]
    for window in range(3):
        keys, values = torch.randn(2, H, 5, d), torch.randn(2, H, 5, d)
        mask = torch.ones(2, 5, dtype=torch.bool)
        if window == 0:
            mask[1, :3] = False  # row 1 has two real tokens in its first window
        memory.add(keys, values, mask)
        for b in range(2):
            stored[b] += [(keys[b, :, t], values[b, :, t]) for t in range(5) if mask[b, t]]
    assert len(memory) == 15
    queries = torch.randn(2, H, 6, d)
    found = memory.lookup(queries, 0, H)
    probs = torch.softmax(found.scores.masked_fill(~found.valid, float("-inf")), dim=-1)
    mixed = found.mix(probs)
    for b in range(2):
        keys = torch.stack([key for key, _ in stored[b]])  # [m, H, d]
        values = torch.stack([value for _, value in stored[b]])
        for h in range(H):
            for t in range(6):
                scores = keys[:, h] @ queries[b, h, t]
                pick = torch.cat([torch.arange(n), n + scores[n:].topk(k).indices])
                want = torch.softmax(scores[pick], 0) @ values[pick, h]
                assert torch.allclose(mixed[b, h, t], want, atol=1e-5)


def test_document_round_trip_with_sinks(tmp_path):
    model = tiny_model(seed=7, mem_distance=12, mem_sink_tokens=5, memory_spec="exact k=3")
    ids = torch.randint(3, model.config.vocab_size, (75,), generator=torch.Generator().manual_seed(1)).tolist()
    doc = Document.read(model, ids, progress=False)
    question = [5, 6, 7]
    before = doc.ask(question, max_new_tokens=6)
    assert torch.equal(doc.ask(question, max_new_tokens=6), before)  # asking leaves the sinks and memory unchanged
    doc.save(tmp_path / "doc.memory")
    loaded = Document.load(tmp_path / "doc.memory", model)
    assert torch.equal(loaded.ask(question, max_new_tokens=6), before)
    other = tiny_model(seed=7, mem_distance=12, mem_sink_tokens=4, memory_spec="exact k=3")
    with pytest.raises(ValueError, match="another model or memory configuration"):
        Document.load(tmp_path / "doc.memory", other)


@pytest.mark.parametrize("overrides, message", [
    (dict(mem_distance=-1), "mem_distance"), (dict(mem_distance=8, mem_positionals=False), "mem_positionals"),
    (dict(mem_sink_tokens=-2), "mem_sink_tokens"), (dict(mem_sink_tokens=10**20), "mem_sink_tokens"),
    (dict(mem_distance=10**20), "mem_distance"),
])
def test_bad_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**overrides)


@pytest.mark.parametrize("overrides", [dict(mem_distance=True), dict(mem_distance=2.5), dict(mem_sink_tokens="4")])
def test_settings_of_the_wrong_type(overrides):
    """transformers' strict config dataclass refuses them, naming the field."""
    with pytest.raises(StrictDataclassFieldValidationError, match=next(iter(overrides))):
        tiny_model(**overrides)


def test_sink_state_is_checked():
    memory = SinkMemory(KnnMemory(1, 2, 4, "exact k=2", dtype=torch.float32, device="cpu"), 3)
    memory.add(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.ones(1, 5, dtype=torch.bool))
    state = memory.state_dict()
    assert state["sinks.taken"].tolist() == [3] and len(memory) == 5
    other = SinkMemory(KnnMemory(1, 2, 4, "exact k=2", dtype=torch.float32, device="cpu"), 2)
    with pytest.raises(ValueError, match="at most 2 tokens"):
        other.load_state_dict(state)
    bad = dict(state, **{"sinks.taken": torch.tensor([2])})
    with pytest.raises(ValueError, match="sink memory"):
        memory.load_state_dict(bad)


def reference_blocks(stored, queries, block, k, token_k=0):
    """Brute force for one (row, head): the k blocks of `block` tokens whose mean key best matches the mean query,
    plus the incomplete last block; every query attends to their tokens, or (token_k > 0) to its token_k
    best-scoring ones among them. stored: keys, values [n, d]."""
    keys, values = stored
    n = len(keys)
    complete = n // block
    reps = keys[: complete * block].reshape(complete, block, -1).mean(1)
    chosen = (reps @ queries.mean(0)).topk(min(k, complete)).indices if complete else torch.empty(0, dtype=torch.long)
    tokens = torch.cat([torch.arange(c * block, (c + 1) * block) for c in chosen.tolist()] +
                       [torch.arange(complete * block, n)])
    if not token_k:
        return torch.softmax(queries @ keys[tokens].T, dim=-1) @ values[tokens]
    out = []
    for query in queries:
        scores = keys[tokens] @ query
        best = tokens[scores.topk(min(token_k, len(tokens))).indices]
        out.append(torch.softmax(keys[best] @ query, dim=-1) @ values[best])
    return torch.stack(out)


@pytest.mark.parametrize("spec", ["exact k=2 block=4", "Flat k=3 block=3", "exact k=50 block=4",
                                  "exact k=2 block=4 token_k=3", "Flat k=3 block=3 token_k=5"])
def test_block_memory_lookup_against_brute_force(spec):
    from knn_longllama.memory import BlockMemory, make_memory

    torch.manual_seed(0)
    H, d = 2, 8
    memory = make_memory(spec, 2, H, d, dtype=torch.float32, device="cpu")
    assert isinstance(memory, BlockMemory)
    stored = {b: ([], []) for b in range(2)}
    for window in range(4):
        keys, values = torch.randn(2, H, 7, d), torch.randn(2, H, 7, d)
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[1, : 2 + window] = False  # row 1: fewer real tokens, blocks cross windows differently
        memory.add(keys, values, mask)
        for b in range(2):
            stored[b][0].append(keys[b][:, mask[b]])
            stored[b][1].append(values[b][:, mask[b]])
        queries = torch.randn(2, H, 5, d)
        found = memory.lookup(queries, 0, H)
        mixed = found.mix(torch.softmax(found.scores.masked_fill(~found.valid, float("-inf")), dim=-1))
        block, k = memory.block, memory.k
        last = memory.lookup(queries[:, 1:], 1, H)  # a lookup of the last head alone (a chunk of heads)
        alone = last.mix(torch.softmax(last.scores.masked_fill(~last.valid, float("-inf")), dim=-1))
        for b in range(2):
            keys_b, values_b = torch.cat(stored[b][0], dim=1), torch.cat(stored[b][1], dim=1)
            for h in range(H):
                want = reference_blocks((keys_b[h], values_b[h]), queries[b, h], block, k, memory.token_k)
                assert torch.allclose(mixed[b, h], want, atol=1e-5)
            assert torch.allclose(alone[b, 0], mixed[b, H - 1], atol=1e-5)
    state = memory.state_dict()
    again = make_memory(spec, 2, H, d, dtype=torch.float32, device="cpu")
    again.load_state_dict(state)
    redo = again.lookup(queries, 0, H)
    assert torch.equal(redo.scores, found.scores) and torch.equal(redo.values, found.values)
    with pytest.raises(ValueError, match="representatives"):
        again.load_state_dict(dict(state, sizes=state["sizes"] - torch.tensor([0, 4])))  # row 1 is the shorter


def test_block_memory_reads_a_document(tmp_path):
    """Through the model: read, ask, save and load with block retrieval and sinks."""
    model = tiny_model(seed=8, mem_distance=12, mem_sink_tokens=3, memory_spec="exact k=2 block=4", mem_layers=[1, 2])
    ids = torch.randint(3, model.config.vocab_size, (90,), generator=torch.Generator().manual_seed(2)).tolist()
    doc = Document.read(model, ids, progress=False)
    before = doc.ask([4, 5], max_new_tokens=5)
    doc.save(tmp_path / "doc.memory")
    assert torch.equal(Document.load(tmp_path / "doc.memory", model).ask([4, 5], max_new_tokens=5), before)


def test_training_free_rule_from_a_llama_folder(tmp_path):
    """from_pretrained(training_free=True) sets the rule's settings from the checkpoint's trained context; explicit
    keyword arguments win."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from knn_longllama import LongLlamaForCausalLM
    from knn_longllama.configuration_longllama import training_free_settings

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
                     ).save_pretrained(tmp_path / "llama")
    model = LongLlamaForCausalLM.from_pretrained(tmp_path / "llama", training_free=True, mem_sink_tokens=8)
    c = model.config
    assert (c.mem_layers, c.max_position_embeddings, c.last_context_length, c.mem_distance, c.mem_sink_tokens,
            c.memory_spec) == ([0, 1, 2], 256, 128, None, 8, "IVF1024,Flat k=32 metric=l2 train=grow nprobe=32")
    assert training_free_settings(8192)["max_position_embeddings"] == 512
    assert training_free_settings(100)["max_position_embeddings"] == 25 and training_free_settings(1)[
        "last_context_length"] == 1
    assert c._attn_implementation == "sdpa"  # the rule's attention; an explicit choice wins
    eager = LongLlamaForCausalLM.from_pretrained(tmp_path / "llama", training_free=True, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama", attn_implementation="sdpa")  # the GGUF route
    assert LongLlamaForCausalLM.from_llama(llama).config._attn_implementation == "eager"
    assert LongLlamaForCausalLM.from_llama(llama, attn_implementation="sdpa").config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="trained_context"):
        training_free_settings(0)
    with pytest.raises(ValueError, match="training_free"):
        LongLlamaForCausalLM.from_pretrained(tmp_path / "llama", config=c, training_free=True)


def test_training_free_flag_refuses_the_demo(capsys):
    from knn_longllama.cli import main

    assert main(["passkey", "--training-free", "--lengths", "300"]) == 2
    assert "--training-free" in capsys.readouterr().err


def test_token_k_spec_round_trips_and_is_checked():
    from knn_index import MemorySpec

    spec = MemorySpec.parse("exact k=16 block=128 token_k=32")
    assert spec.token_k == 32 and str(spec) == "exact k=16 block=128 token_k=32"
    assert MemorySpec.coerce(spec.to_dict()) == spec and MemorySpec.parse("exact k=16 block=128").token_k == 0
    for text, message in [("exact k=4 token_k=3", "needs block > 1"), ("exact k=4 block=8 token_k=-1", "token_k"),
                          ("exact k=4 block=8 token_k=1.5", "token_k"), ("exact k=4 block=8 token_k=x", "token_k")]:
        with pytest.raises(ValueError, match=message):
            MemorySpec.parse(text)
