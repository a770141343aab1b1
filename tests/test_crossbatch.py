"""FoT cross-batch attention (docs/semantics.md, "FoT cross-batch training"): which rows each row sees, and the math against dense memory."""

import torch

from knn_longllama.memory import crossbatch_sources

from conftest import tiny_model


def test_each_row_sees_exactly_the_previous_rows():
    sources = crossbatch_sources(batch_size=6, extra_contexts=3)
    visible = {b: sorted(int(s) for s in sources[b] if s >= 0) for b in range(6)}
    assert visible == {0: [], 1: [0], 2: [0, 1], 3: [0, 1, 2], 4: [1, 2, 3], 5: [2, 3, 4]}


def test_crossbatch_row_equals_dense_memory_of_previous_rows():
    """With one memory layer, row b under cross-batch attention = row b read after rows b-E..b-1 went to memory."""
    model = tiny_model(mem_layers=[1], max_position_embeddings=16)
    rows = torch.randint(3, 61, (5, 16))
    mask = torch.ones_like(rows)
    mask[0, :3] = 0  # padding in a source row must stay invisible
    extra = 2
    with torch.no_grad():
        crossbatch = model(rows, attention_mask=mask, use_cache=False, crossbatch_contexts=extra).logits
        for b in range(rows.shape[0]):
            sources = list(range(max(0, b - extra), b))
            ids = torch.cat([rows[s] for s in sources] + [rows[b]])[None]
            full_mask = torch.cat([mask[s] for s in sources] + [mask[b]])[None]
            dense = model(ids, attention_mask=full_mask, use_cache=False, last_context_length=16).logits[:, -16:]
            real = mask[b].bool()
            assert torch.allclose(crossbatch[b][real], dense[0][real], atol=1e-5), b


def test_crossbatch_has_gradients_through_other_rows():
    model = tiny_model(mem_layers=[1]).train()
    rows = torch.stack([torch.randint(3, 30, (16,)), torch.randint(30, 61, (16,))])  # disjoint vocabularies
    embeds = model.model.embed_tokens.weight
    for contexts, expect_gradient in ((1, True), (0, False)):
        out = model(rows, use_cache=False, crossbatch_contexts=contexts)
        grad = torch.autograd.grad(out.logits[1].sum(), embeds)[0]
        # row 1's output depends on row 0's keys/values (with gradients) only under cross-batch attention
        assert (grad[rows[0]].abs().sum() > 0) == expect_gradient
