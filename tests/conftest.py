import pytest
import torch

import knn_index
from knn_longllama import LongLlamaConfig, LongLlamaForCausalLM

# Tiny models: one thread is fastest, and it keeps torch's and Faiss's OpenMP pools from spinning against each
# other (and against anything else running on the machine).
knn_index.set_num_threads(1)


def tiny_config(**overrides) -> LongLlamaConfig:
    """A few-thousand-parameter LongLLaMA for fast tests."""
    fields = dict(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=16, last_context_length=8, mem_layers=[1],
        mem_dtype="float32", rms_norm_eps=1e-6, eos_token_id=None,  # no early stop in generation tests
    )
    fields.update(overrides)
    return LongLlamaConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> LongLlamaForCausalLM:
    torch.manual_seed(seed)
    model = LongLlamaForCausalLM(tiny_config(**overrides)).eval()
    # Larger-than-default weights so that attention is far from uniform and memory matters numerically.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(8.0)
    return model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
