"""kNN memory inside the model: equal to dense when k covers the memory, exact top-k semantics otherwise."""

import math

import pytest
import torch

from knn_index import MemorySpec
from knn_longllama.memory import DenseMemory, KnnMemory

from conftest import tiny_model

KNN_SPECS = ["Flat", "exact", "Flat metric=l2"]


def padded_batch(n, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 61, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :pad], ids[1, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("spec", KNN_SPECS)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_knn_with_k_covering_memory_equals_dense(spec, kv_heads):
    ids, mask = padded_batch(90, pad=7)  # 5 windows of 16 into memory, last 8 local
    dense = tiny_model(mem_layers=[1], num_key_value_heads=kv_heads)
    knn = tiny_model(mem_layers=[1], num_key_value_heads=kv_heads, memory_spec=f"{spec} k=200")
    with torch.no_grad():
        a = dense(ids, attention_mask=mask).logits
        b = knn(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("spec", KNN_SPECS)
def test_memory_is_chosen_per_call_and_the_config_stays_as_loaded(spec):
    ids, mask = padded_batch(60, pad=3)
    model = tiny_model(mem_layers=[1])
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        small_k = model(ids, attention_mask=mask, memory_spec=f"{spec} k=4").logits
        big_k = model(ids, attention_mask=mask, memory_spec=f"{spec} k=1000").logits
        generated = model.generate(ids[:1], max_new_tokens=3, do_sample=False, memory_spec=f"{spec} k=4",
                                   return_dict_in_generate=True)
    real = mask.bool()
    assert (dense[real] - big_k[real]).abs().max() <= 1e-5
    assert (dense[real] - small_k[real]).abs().max() > 1e-4  # k=4 of up to 48 entries: really top-k
    assert model.config.memory_spec == "dense"
    assert isinstance(generated.past_key_values.memories[1], KnnMemory)
    assert str(generated.past_key_values.memories[1].store.spec) == str(MemorySpec.parse(f"{spec} k=4"))
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        model(ids, memory_spec="Flat bogus=1")


def test_legacy_memory_fields_still_load():
    """Configs saved by earlier versions carry mem_backend / mem_index / ...; they fold into memory_spec."""
    model = tiny_model(mem_layers=[1], mem_backend="faiss", mem_index="IVF4,Flat", mem_index_params={"nprobe": 2},
                       mem_knn_k=8, mem_knn_k_factor=2, mem_faiss_metric="l2", mem_faiss_search="big_batch")
    assert model.config.memory_spec == "IVF4,Flat k=8 k_factor=2 metric=l2 scan=big_batch nprobe=2"
    assert tiny_model(mem_layers=[1], mem_backend="torch_topk", mem_index="IVF4,Flat", mem_knn_k=3).config.memory_spec \
        == "exact k=3"  # exact search ignores Faiss fields, as it always did
    assert "mem_backend" not in model.config.to_dict() and model.config.to_dict()["memory_spec"] == \
        model.config.memory_spec
    with pytest.raises(ValueError, match="`mem_backend` must be one of"):
        tiny_model(mem_layers=[1], mem_backend="bogus")


@pytest.mark.parametrize("index", ["Flat", "exact"])
def test_memory_layer_keeps_exactly_the_top_k_entries_in_one_joint_softmax(index):
    """Attention of one memory layer with k < memory size against a brute-force top-k in the test."""
    torch.manual_seed(0)
    model = tiny_model(mem_layers=[1], num_key_value_heads=2)
    attn = model.model.layers[1].self_attn
    bsz, kv_heads, d, groups, n_mem, n_local, k = 2, 2, 8, 2, 40, 5, 6
    mem_k, mem_v = torch.randn(bsz, kv_heads, n_mem, d), torch.randn(bsz, kv_heads, n_mem, d)
    mem_mask = torch.ones(bsz, n_mem, dtype=torch.bool)
    mem_mask[1, :9] = False  # row 1 has padding in memory
    knn = KnnMemory(bsz, kv_heads, d, MemorySpec(index, k=k), dtype=torch.float32, device="cpu")
    knn.add(mem_k, mem_v, mem_mask)
    q = torch.randn(bsz, kv_heads * groups, n_local, d)
    local_k, local_v = torch.randn(bsz, kv_heads, n_local, d), torch.randn(bsz, kv_heads, n_local, d)
    allowed = torch.tril(torch.ones(n_local, n_local, dtype=torch.bool))[None, None].expand(bsz, 1, -1, -1)
    with torch.no_grad():
        out = attn._attend_eager(q, local_k, local_v, allowed, knn)
    for b in range(bsz):
        for h in range(kv_heads * groups):
            kvh = h // groups
            for t in range(n_local):
                local_scores = [float(q[b, h, t] @ local_k[b, kvh, j]) / math.sqrt(d) for j in range(t + 1)]
                mem_scores = sorted(((float(q[b, h, t] @ mem_k[b, kvh, i]), i) for i in range(n_mem) if mem_mask[b, i]),
                                    reverse=True)[:k]
                scores = torch.tensor(local_scores + [s / math.sqrt(d) for s, _ in mem_scores], dtype=torch.float64)
                probs = torch.softmax(scores, dim=0)
                values = torch.cat([local_v[b, kvh, : t + 1], mem_v[b, kvh, [i for _, i in mem_scores]]]).double()
                expected = probs @ values
                assert torch.allclose(out[b, h, t].double(), expected, atol=1e-5), (b, h, t)


def test_dense_and_knn_memories_offer_the_same_entries():
    keys, values = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    mask = torch.ones(1, 30, dtype=torch.bool)
    dense = DenseMemory(torch.float32)
    dense.add(keys, values, mask)
    knn = KnnMemory(1, 2, 8, "Flat k=30", dtype=torch.float32, device="cpu")
    knn.add(keys, values, mask)
    q = torch.randn(1, 2, 4, 8)
    a, b = dense.lookup(q, 0, 2), knn.lookup(q, 0, 2)
    assert torch.allclose(a.scores.sort(-1).values, b.scores.sort(-1).values, atol=1e-5)


@pytest.mark.parametrize("spec", KNN_SPECS)
def test_a_window_never_retrieves_itself(spec, monkeypatch):
    """Window w (of 16 tokens) searches a memory holding exactly the windows before it."""
    model = tiny_model(mem_layers=[1], memory_spec=f"{spec} k=1000")
    sizes = []
    original = KnnMemory.lookup

    def recording_lookup(self, queries, h0, h1):
        sizes.append(self.store.sizes())
        return original(self, queries, h0, h1)

    monkeypatch.setattr(KnnMemory, "lookup", recording_lookup)
    with torch.no_grad():
        model(torch.randint(3, 61, (2, 64)), use_cache=False, last_context_length=16)
    assert sizes == [[0, 0], [16, 16], [32, 32], [48, 48]]


def test_k_factor_reranks_candidates_of_a_compressed_index_by_exact_score():
    """PQ ranks by compressed distances; fetching k_factor * k candidates and keeping the k best exact scores
    recovers the brute-force top-k once the candidates cover the memory."""
    torch.manual_seed(0)
    n, d, k = 1100, 8, 6  # 1100 keys: over the 1024 that a 4-bit PQ trains on, so the index really compresses
    keys, values = torch.randn(1, 1, n, d), torch.randn(1, 1, n, d)
    mask = torch.ones(1, n, dtype=torch.bool)
    q = torch.randn(1, 1, 16, d)
    exact = (q[0, 0] @ keys[0, 0].T).topk(k, dim=-1)

    def top_ids(k_factor):
        mem = KnnMemory(1, 1, d, MemorySpec("PQ2x4", k=k, k_factor=k_factor), dtype=torch.float32, device="cpu")
        mem.add(keys, values, mask)
        found = mem.store.search(q, k)
        return found.ids[0, 0], found.scores[0, 0]

    ids, _ = top_ids(1)
    assert any(set(ids[t].tolist()) != set(exact.indices[t].tolist()) for t in range(16))  # PQ alone is approximate
    ids, scores = top_ids(n // k + 1)
    for t in range(16):
        assert set(ids[t].tolist()) == set(exact.indices[t].tolist())
        assert torch.allclose(scores[t].sort(descending=True).values, exact.values[t], atol=1e-5)


def test_k_factor_metric_and_scan_come_from_the_memory_spec():
    model = tiny_model(mem_layers=[1], memory_spec="HNSW8 k=4 k_factor=4 metric=l2")
    store = model.model.new_memory(1, "cpu").store
    assert store.spec.k_factor == 4 and store.spec.metric == "l2"
    assert store.faiss_index(0, 0).d == model.config.head_dim + 1  # norm-augmented keys
    assert model.model.new_memory(1, "cpu", "exact k=4").store.faiss_index(0, 0) is None
    with pytest.raises(ValueError, match="k_factor must be an int"):
        tiny_model(mem_layers=[1], memory_spec="Flat k_factor=0")


def test_big_batch_faiss_search_gives_the_index_search_outputs():
    """scan=big_batch (IVF lists scanned once per window for all its queries) finds what the index's own search
    finds: the same logits, with an IVF index past its training size (1024 keys)."""
    ids, mask = padded_batch(1200, pad=5)
    model = tiny_model(mem_layers=[1])
    spec = "IVF4,Flat k=8 nprobe=2 metric=l2"
    with torch.no_grad():
        a = model(ids, attention_mask=mask, use_cache=True, memory_spec=spec)
        b = model(ids, attention_mask=mask, use_cache=True, memory_spec=spec + " scan=big_batch")
    assert all(b.cache.memories[1].store.trained) and b.cache.memories[1].store.spec.scan == "big_batch"
    real = mask.bool()
    assert (a.logits[real] - b.logits[real]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="scan='big_batch' needs an IVF index"):
        model(ids, memory_spec="HNSW8 scan=big_batch")
