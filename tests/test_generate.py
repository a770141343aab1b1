"""Generation through Hugging Face `generate()` with the model's own cache."""

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from knn_longllama import LongLlamaCache

from conftest import tiny_model


def manual_greedy(model, ids, mask, steps, last_context_length):
    """Greedy decoding by hand: one forward over the prompt, then one token at a time with the cache."""
    out = model(ids, attention_mask=mask, use_cache=True, last_context_length=last_context_length)
    tokens, cache = [], out.cache
    for _ in range(steps):
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(next_token)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
        out = model(next_token, attention_mask=mask, cache=cache, use_cache=True)
    return torch.cat(tokens, dim=1), cache


@pytest.mark.parametrize("mem_layers", [[1], [0, 2]])
def test_generate_greedy_equals_manual_loop_across_evictions(mem_layers):
    model = tiny_model(mem_layers=mem_layers, num_key_value_heads=2)
    ids = torch.randint(3, 61, (2, 37))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    ids[0, :4] = 0
    steps = 30  # local cache starts at 8 tokens, window 16: at least one eviction into memory
    with torch.no_grad():
        expected, cache = manual_greedy(model, ids, mask, steps, last_context_length=8)
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                   last_context_length=8, pad_token_id=0)
    assert len(cache.memories[mem_layers[0]]) > 37 - 8  # evictions moved the local cache into memory
    assert torch.equal(generated[:, 37:], expected)


def test_generate_last_context_length_kwarg_and_config_default():
    model = tiny_model()
    ids = torch.randint(3, 61, (1, 40))
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=5, do_sample=False, last_context_length=3)
        b = model.generate(ids, max_new_tokens=5, do_sample=False)  # config default 8
        manual_a, _ = manual_greedy(model, ids, torch.ones_like(ids), 5, last_context_length=3)
    assert torch.equal(a[:, 40:], manual_a)
    assert a.shape == b.shape == (1, 45)


def test_sampling_options_run_and_are_seeded():
    model = tiny_model()
    ids = torch.randint(3, 61, (2, 20))
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.9, top_k=20)
    with torch.no_grad():
        torch.manual_seed(5)
        a = model.generate(ids, **kwargs)
        torch.manual_seed(5)
        b = model.generate(ids, **kwargs)
        torch.manual_seed(6)
        c = model.generate(ids, **dict(kwargs, temperature=5.0, top_p=1.0, top_k=0))
    assert torch.equal(a, b) and a.shape == (2, 32)
    assert not torch.equal(a, c)
    assert ((a[:, 20:] >= 0) & (a[:, 20:] < 61)).all()


def test_stopping_criteria_and_streamer():
    model = tiny_model()
    ids = torch.randint(3, 61, (1, 20))

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 26, dtype=torch.bool)

    streamed = []

    class Collect(TextStreamer):
        def __init__(self):
            pass

        def put(self, value):
            streamed.append(value.flatten().tolist())

        def end(self):
            streamed.append("end")

    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=50, do_sample=False, stopping_criteria=StoppingCriteriaList([StopAfter()]),
                             streamer=Collect())
    assert out.shape == (1, 26)
    assert streamed[0] == ids[0].tolist() and streamed[-1] == "end"
    assert [t for chunk in streamed[1:-1] for t in chunk] == out[0, 20:].tolist()


def test_generate_returns_our_cache_and_beam_search_is_refused():
    model = tiny_model()
    ids = torch.randint(3, 61, (1, 30))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        assert isinstance(out.cache, LongLlamaCache) and out.cache.get_seq_length() == 32
        with pytest.raises(NotImplementedError, match="beam search"):
            model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)


def test_default_generation_length_is_not_capped_at_the_window():
    model = tiny_model()  # window of 16 tokens
    with torch.no_grad():
        out = model.generate(torch.randint(3, 61, (1, 40)), do_sample=False)
    assert out.shape == (1, 60)  # 20 new tokens, as for any transformers model
