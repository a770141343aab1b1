"""Bad input gets a ValueError that names the argument and what is accepted."""

import pytest
import torch

from knn_longllama import LongLlamaForCausalLM

from conftest import tiny_config, tiny_model


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(mem_layers=[3]), r"`mem_layers` must hold layer indices in \[0, 2\]"),
        (dict(mem_layers=[-1]), r"`mem_layers`"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), r"`rope_scaling` must be null"),
        (dict(last_context_length=0), r"`last_context_length` must be a positive int"),
        (dict(mem_dtype="int8"), r"`mem_dtype` must be one of \('float32', 'bfloat16', 'float16'\)"),
        (dict(mem_attention_grouping=(0, 4)), r"`mem_attention_grouping`"),
        (dict(num_key_value_heads=3), r"`num_key_value_heads` must divide"),
        (dict(mem_backend="annoy"), r"`mem_backend` must be one of"),
        (dict(mem_backend="faiss", mem_knn_k=0), r"k must be an int in \[1, "),
        (dict(memory_spec="Flat k=0"), r"`memory_spec`: k must be an int in \[1, "),
        (dict(memory_spec="Flat metric=cosine"), r"metric='cosine' is unknown; accepted values: \('ip', 'l2'\)"),
        (dict(memory_spec="IVF4,Flat scan=fast"), r"scan='fast' is unknown; accepted values: \('index', 'big_batch'\)"),
        (dict(memory_spec="HNSW1"), r"HNSW needs M >= 2"),
        (dict(memory_spec={"index": "Flat", "nprobe": 3}), r"unknown fields \['nprobe'\]"),
    ],
)
def test_bad_config_values(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_config(**overrides)


def test_mem_layers_changed_after_config_creation_are_checked_by_the_model():
    config = tiny_config()
    config.mem_layers = [7]
    with pytest.raises(ValueError, match="`mem_layers`"):
        LongLlamaForCausalLM(config)


def test_bad_forward_inputs():
    model = tiny_model()
    ids = torch.randint(3, 61, (2, 10))
    with pytest.raises(ValueError, match="`input_ids` must be a non-empty"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="`last_context_length` must be a positive int"):
        model(ids, last_context_length=-4)
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape \[batch=2, length\] with length in \[10\]"):
        model(ids, attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="`attention_mask`"):
        model(ids, attention_mask=torch.ones(3, 10))
    with pytest.raises(ValueError, match="`position_ids` must have shape"):
        model(ids, position_ids=torch.arange(9)[None].expand(2, 9))
    out = model(ids, use_cache=True)
    with pytest.raises(ValueError, match=r"length in \[1, 11\]"):
        model(ids[:, :1], attention_mask=torch.ones(2, 5), cache=out.cache)
    with pytest.raises(ValueError, match="`use_cache=False` cannot be combined"):
        model(ids[:, :1], cache=out.cache, use_cache=False)
    with pytest.raises(ValueError, match="exactly one of `input_ids` or `inputs_embeds`"):
        model()
