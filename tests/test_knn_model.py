"""kNN memory inside the model: equal to dense when k covers the memory, exact top-k semantics otherwise."""

import math

import pytest
import torch

from knn_longllama.memory import DenseMemory, KnnMemory

from conftest import tiny_model

KNN_BACKENDS = [dict(mem_backend="faiss", mem_index="Flat"), dict(mem_backend="torch_topk"),
                dict(mem_backend="faiss", mem_index="Flat", mem_faiss_metric="l2")]


def padded_batch(n, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 61, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :pad], ids[1, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("backend", KNN_BACKENDS, ids=lambda b: "-".join(map(str, b.values())))
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_knn_with_k_covering_memory_equals_dense(backend, kv_heads):
    ids, mask = padded_batch(90, pad=7)  # 5 windows of 16 into memory, last 8 local
    dense = tiny_model(mem_layers=[1], num_key_value_heads=kv_heads)
    knn = tiny_model(mem_layers=[1], num_key_value_heads=kv_heads, mem_knn_k=200, **backend)
    with torch.no_grad():
        a = dense(ids, attention_mask=mask).logits
        b = knn(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", KNN_BACKENDS, ids=lambda b: b["mem_backend"])
def test_memory_can_be_switched_on_a_loaded_model(backend):
    ids, mask = padded_batch(60, pad=3)
    model = tiny_model(mem_layers=[1])
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        for key, value in dict(backend, mem_knn_k=4).items():
            setattr(model.config, key, value)
        small_k = model(ids, attention_mask=mask).logits
        model.config.mem_knn_k = 1000
        big_k = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (dense[real] - big_k[real]).abs().max() <= 1e-5
    assert (dense[real] - small_k[real]).abs().max() > 1e-4  # k=4 of up to 48 entries: really top-k
    model.config.mem_backend = "bogus"
    with pytest.raises(ValueError, match="`mem_backend` must be one of"):
        model(ids)


def test_torch_topk_ignores_faiss_index_settings_left_on_the_config():
    ids, mask = padded_batch(60, pad=3)
    model = tiny_model(mem_layers=[1], mem_backend="faiss", mem_index="IVF4,Flat", mem_index_params={"nprobe": 2})
    with torch.no_grad():
        dense = tiny_model(mem_layers=[1])(ids, attention_mask=mask).logits
        model.config.mem_backend, model.config.mem_knn_k = "torch_topk", 1000
        exact = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (dense[real] - exact[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["faiss", "torch_topk"])
def test_memory_layer_keeps_exactly_the_top_k_entries_in_one_joint_softmax(backend):
    """Attention of one memory layer with k < memory size against a brute-force top-k in the test."""
    torch.manual_seed(0)
    model = tiny_model(mem_layers=[1], num_key_value_heads=2)
    attn = model.model.layers[1].self_attn
    bsz, kv_heads, d, groups, n_mem, n_local, k = 2, 2, 8, 2, 40, 5, 6
    mem_k, mem_v = torch.randn(bsz, kv_heads, n_mem, d), torch.randn(bsz, kv_heads, n_mem, d)
    mem_mask = torch.ones(bsz, n_mem, dtype=torch.bool)
    mem_mask[1, :9] = False  # row 1 has padding in memory
    knn = KnnMemory(bsz, kv_heads, d, k=k, backend=backend, index="Flat", index_params=None,
                    dtype=torch.float32, device="cpu")
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
    knn = KnnMemory(1, 2, 8, k=30, backend="faiss", index="Flat", index_params=None, dtype=torch.float32, device="cpu")
    knn.add(keys, values, mask)
    q = torch.randn(1, 2, 4, 8)
    a, b = dense.lookup(q, 0, 2), knn.lookup(q, 0, 2)
    assert torch.allclose(a.scores.sort(-1).values, b.scores.sort(-1).values, atol=1e-5)


@pytest.mark.parametrize("backend", KNN_BACKENDS, ids=lambda b: b["mem_backend"])
def test_a_window_never_retrieves_itself(backend, monkeypatch):
    """Window w (of 16 tokens) searches a memory holding exactly the windows before it."""
    model = tiny_model(mem_layers=[1], mem_knn_k=1000, **backend)
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
        mem = KnnMemory(1, 1, d, k=k, backend="faiss", index="PQ2x4", index_params=None, dtype=torch.float32,
                        device="cpu", k_factor=k_factor)
        mem.add(keys, values, mask)
        found = mem.store.search(q, k)
        return found.ids[0, 0], found.scores[0, 0]

    ids, _ = top_ids(1)
    assert any(set(ids[t].tolist()) != set(exact.indices[t].tolist()) for t in range(16))  # PQ alone is approximate
    ids, scores = top_ids(n // k + 1)
    for t in range(16):
        assert set(ids[t].tolist()) == set(exact.indices[t].tolist())
        assert torch.allclose(scores[t].sort(descending=True).values, exact.values[t], atol=1e-5)


def test_k_factor_comes_from_the_config():
    model = tiny_model(mem_layers=[1], mem_backend="faiss", mem_index="Flat", mem_knn_k_factor=4)
    assert model.model.new_memory(1, "cpu", torch.float32).store.k_factor == 4
    model.config.mem_backend = "torch_topk"  # exact: nothing to re-rank
    assert model.model.new_memory(1, "cpu", torch.float32).store.k_factor == 1
    with pytest.raises(ValueError, match="`mem_knn_k_factor` must be a positive int"):
        tiny_model(mem_layers=[1], mem_knn_k_factor=0)


def test_big_batch_faiss_search_gives_the_index_search_outputs():
    """mem_faiss_search="big_batch" (IVF lists scanned once per window for all its queries) finds what the index's
    own search finds: the same logits, with an IVF index past its training size (1024 keys)."""
    ids, mask = padded_batch(1200, pad=5)
    settings = dict(mem_layers=[1], mem_backend="faiss", mem_index="IVF4,Flat", mem_index_params={"nprobe": 2},
                    mem_knn_k=8, mem_faiss_metric="l2")
    plain = tiny_model(**settings)
    batched = tiny_model(**settings, mem_faiss_search="big_batch")
    assert batched.model.new_memory(1, "cpu", torch.float32).store.faiss_search == "big_batch"
    with torch.no_grad():
        a = plain(ids, attention_mask=mask, use_cache=True)
        b = batched(ids, attention_mask=mask, use_cache=True)
    assert all(b.cache.memories[1].store.trained)
    real = mask.bool()
    assert (a.logits[real] - b.logits[real]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="faiss_search='big_batch' needs an IVF index"):
        tiny_model(mem_layers=[1], mem_backend="faiss", mem_index="HNSW8", mem_faiss_search="big_batch")(ids)


def test_faiss_metric_comes_from_the_config():
    model = tiny_model(mem_layers=[1], mem_backend="faiss", mem_index="HNSW8", mem_faiss_metric="l2")
    store = model.model.new_memory(1, "cpu", torch.float32).store
    assert store.faiss_metric == "l2" and store.faiss_index(0, 0).d == model.config.head_dim + 1
    model.config.mem_backend = "torch_topk"  # exact in torch: no Faiss index
    assert model.model.new_memory(1, "cpu", torch.float32).store.faiss_metric == "ip"
