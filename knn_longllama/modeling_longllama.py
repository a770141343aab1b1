"""LongLLaMA (Focused Transformer) for transformers 5.x, readable top to bottom.

The architecture is Hugging Face LLaMA (same state-dict names). A few *memory layers* also attend to a memory of
(key, value) pairs from earlier context windows, with one fp32 softmax over local and memory scores. Long inputs are
split into windows of `max_position_embeddings` tokens; see `split_windows` and `LongLlamaModel.forward`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaForCausalLM, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation.stopping_criteria import MaxLengthCriteria
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_longllama import (ATTN_IMPLEMENTATIONS, LEGACY_MEMORY_FIELDS, LongLlamaConfig,
                                     check_last_context_length, legacy_memory_spec, training_free_settings)
from .memory import CrossBatchMemory, SinkMemory, SoftmaxPart, make_memory


def split_windows(num_tokens: int, window: int, last_context_length: int) -> list[tuple[int, int]]:
    """Window bounds for `num_tokens` new tokens: the first `max(N - L, 0)` tokens in windows of `window` tokens
    (the last of them possibly shorter), then one final window with the last `min(N, L)` tokens."""
    prefix = max(num_tokens - last_context_length, 0)
    bounds = [(start, min(start + window, prefix)) for start in range(0, prefix, window)]
    return bounds + [(prefix, num_tokens)]


def score_floor(dtype: torch.dtype) -> float:
    """Masked scores are set to, and all scores clamped from below at, max(finfo.min, -1e6) (as the official code)."""
    return max(torch.finfo(dtype).min, -1e6)


class LongLlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LongLlamaRotaryEmbedding(nn.Module):
    """Rotate-half RoPE evaluated at arbitrary (window-relative) positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[B, T]` -> (cos, sin), each `[B, 1, T, head_dim]` in `dtype`."""
        freqs = positions[:, :, None].float() * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class LongLlamaMLP(nn.Module):
    def __init__(self, config: LongLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class WindowContext:
    """What every layer needs to attend within one window (computed once per window by the model).

    rope: (cos, sin) `[B, 1, T_keys, d]` at window-relative key positions; the queries are the last T_q keys.
    allowed: bool `[B, 1, T_q, T_keys]`: causal and padding mask of the local keys.
    past: per-layer un-rotated local keys/values `[B, H_kv, P, d]` to prepend, or None.
    """

    rope: tuple[torch.Tensor, torch.Tensor]
    allowed: torch.Tensor
    past: list | None
    mask: torch.Tensor | None = None  # `[B, T_keys]` padding mask, needed for FoT cross-batch training
    memory_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) at `mem_distance`, `[1, 1, 1, d]`
    crossbatch_contexts: int = 0  # FoT training: memory layers attend to the previous rows of the batch


class LongLlamaAttention(nn.Module):
    """LLaMA attention; in memory layers, one fp32 softmax over local keys and memory entries (FoT)."""

    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_memory_layer = layer_idx in config.mem_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, window: WindowContext, memory=None):
        """Returns the attention output and the un-rotated local (keys, values) `[B, H_kv, P + T, d]`
        (past local cache, if any, followed by this window)."""
        bsz, q_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if window.past is not None:
            past_k, past_v = window.past[self.layer_idx]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        local_kv = (k, v)
        if self.is_memory_layer and window.crossbatch_contexts > 0:
            memory = CrossBatchMemory(k, v, window.mask, window.crossbatch_contexts)

        q_memory = None  # memory queries rotated at `mem_distance` (docs/semantics.md#training-free)
        if self.is_memory_layer and memory is not None and window.memory_rope is not None:
            q_memory = apply_rotary(q, *window.memory_rope)
        if not self.is_memory_layer or self.config.mem_positionals:
            cos, sin = window.rope
            q = apply_rotary(q, cos[:, :, -q_len:], sin[:, :, -q_len:])
            k = apply_rotary(k, cos, sin)

        fusable = not self.is_memory_layer or memory is None or (getattr(memory, "all_entries", False)
                                                                 and q_memory is None)
        if self.config._attn_implementation == "sdpa" and fusable:
            out = self._attend_sdpa(q, k, v, window.allowed, memory.entries() if memory is not None else None)
        elif self.config._attn_implementation == "sdpa" and window.crossbatch_contexts == 0:
            out = self._attend_parts(q, k, v, window.allowed, memory, q_memory)
        else:
            out = self._attend_eager(q, k, v, window.allowed, memory, q_memory)
        out = out.transpose(1, 2).reshape(bsz, q_len, self.num_heads * self.head_dim)
        return self.o_proj(out), local_kv

    def _attend_sdpa(self, q, k, v, allowed, entries):
        """Fused SDPA over the local keys followed by every memory entry (dense memory: `entries` = keys, values
        `[B, H_kv, N, d]`, valid `[B, N]`), one joint softmax. Blocked scores get `score_floor` added rather than
        set to it: the same output for every query that may attend to at least one key."""
        floor = score_floor(q.dtype)
        n_local = k.shape[2]
        if entries is not None:
            mem_k, mem_v, valid = entries
            k, v = (self._append(local, mem) for local, mem in ((k, mem_k), (v, mem_v)))
        bias = torch.zeros(*allowed.shape[:3], k.shape[2], dtype=q.dtype, device=q.device)
        bias[..., :n_local].masked_fill_(~allowed, floor)
        if entries is not None and not valid.all():
            bias[..., n_local:].masked_fill_(~valid[:, None, None, :], floor)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)

    def _attend_parts(self, q, k, v, allowed, memory, q_memory=None):
        """Fused attention over the local keys and, apart, over what the memory offers (looked up with `q_memory`
        where given), joined as one softmax through their log-sum-exps (`SoftmaxPart`). Entries offered to every query
        of a lookup (`shared_entries`) get a fused call of their own; per-query entries (kNN) their softmax statistics
        from the lookup's scores. The query heads of a KV head are folded into the query axis: no key is repeated. A
        lookup takes the whole window, or each chunk of `mem_attention_grouping`, as `_attend_eager` does."""
        bsz, _, q_len, d = q.shape
        groups = self.num_heads // self.num_kv_heads
        heads_per_chunk, queries_per_chunk = self.num_kv_heads, q_len
        if self.config.mem_attention_grouping is not None:
            max_heads, max_queries = self.config.mem_attention_grouping
            heads_per_chunk, queries_per_chunk = max(1, max_heads // groups), max_queries
        q = q.view(bsz, self.num_kv_heads, groups, q_len, d)
        q_memory = q if q_memory is None else q_memory.view(bsz, self.num_kv_heads, groups, q_len, d)
        floor, scale = score_floor(q.dtype), 1.0 / math.sqrt(d)
        shared = getattr(memory, "shared_entries", False)
        blocked = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, floor)[:, :, None]
        out = torch.empty_like(q)
        for h0 in range(0, self.num_kv_heads, heads_per_chunk):
            h1 = min(h0 + heads_per_chunk, self.num_kv_heads)
            for t0 in range(0, q_len, queries_per_chunk):
                t1 = min(t0 + queries_per_chunk, q_len)
                fold = lambda t: t[:, h0:h1, :, t0:t1].reshape(bsz, h1 - h0, groups * (t1 - t0), d)  # noqa: E731
                bias = blocked[..., t0:t1, :].expand(-1, -1, groups, -1, -1).reshape(bsz, 1, groups * (t1 - t0), -1)
                part = SoftmaxPart.attention(fold(q), k[:, h0:h1], v[:, h0:h1], bias, scale, floor)
                if shared:
                    entries = memory.entries_for(fold(q_memory), h0, h1)
                else:  # sinks (the same for every query) apart from the per-query lookup of the memory they wrap
                    searched = memory.base if isinstance(memory, SinkMemory) else memory
                    found = searched.lookup(fold(q_memory), h0, h1)
                    if found is not None:
                        part = part.merge(found if isinstance(found, SoftmaxPart) else
                                          SoftmaxPart.of(found, scale, floor))
                    entries = memory.sinks.entries_for(fold(q_memory), h0, h1) if searched is not memory else None
                if entries is not None:
                    keys, values, valid = entries
                    bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, floor)
                    part = part.merge(SoftmaxPart.attention(fold(q_memory), keys.to(q.dtype), values.to(q.dtype),
                                                            bias[:, :, None], scale, floor))
                out[:, h0:h1, :, t0:t1] = part.output().to(q.dtype).view(bsz, h1 - h0, groups, t1 - t0, d)
        return out.view(bsz, self.num_heads, q_len, d)

    @staticmethod
    def _append(local: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """[local ; mem] along the tokens in `local`'s dtype, casting memory while copying it (one copy, not two)."""
        out = local.new_empty(*local.shape[:2], local.shape[2] + mem.shape[2], local.shape[3])
        out[:, :, : local.shape[2]] = local
        out[:, :, local.shape[2] :] = mem
        return out

    def _attend_eager(self, q, k, v, allowed, memory, q_memory=None):
        """matmul + fp32 softmax over `[local ; memory]`, chunked by `mem_attention_grouping` (same results).
        Memory is looked up with `q_memory` where given (queries at `mem_distance`), else with `q`."""
        bsz, _, q_len, d = q.shape
        groups = self.num_heads // self.num_kv_heads
        q = q.view(bsz, self.num_kv_heads, groups, q_len, d)
        q_memory = q if q_memory is None else q_memory.view(bsz, self.num_kv_heads, groups, q_len, d)
        heads_per_chunk, queries_per_chunk = self.num_kv_heads, q_len
        if self.is_memory_layer and self.config.mem_attention_grouping is not None:
            max_heads, max_queries = self.config.mem_attention_grouping
            heads_per_chunk, queries_per_chunk = max(1, max_heads // groups), max_queries
        floor = score_floor(q.dtype)
        scale = 1.0 / math.sqrt(d)
        blocked = ~allowed[:, :, None]  # [B, 1, 1, T_q, T_keys]
        single_block = heads_per_chunk >= self.num_kv_heads and queries_per_chunk >= q_len
        out = None if single_block else torch.empty_like(q)
        for h0 in range(0, self.num_kv_heads, heads_per_chunk):
            h1 = min(h0 + heads_per_chunk, self.num_kv_heads)
            for t0 in range(0, q_len, queries_per_chunk):
                t1 = min(t0 + queries_per_chunk, q_len)
                q_block = q[:, h0:h1, :, t0:t1].reshape(bsz, h1 - h0, groups * (t1 - t0), d)
                local = (q_block @ k[:, h0:h1].transpose(-1, -2)).mul_(scale)
                local.view(bsz, h1 - h0, groups, t1 - t0, -1).masked_fill_(blocked[..., t0:t1, :], floor)
                found = None
                if memory is not None:
                    q_mem = q_memory[:, h0:h1, :, t0:t1].reshape(bsz, h1 - h0, groups * (t1 - t0), d)
                    found = memory.lookup(q_mem, h0, h1)
                if found is None:
                    probs = torch.softmax(local.clamp_(min=floor), dim=-1, dtype=torch.float32).to(q.dtype)
                    block_out = probs @ v[:, h0:h1]
                elif isinstance(found, SoftmaxPart):  # memory spread over ranks: its softmax statistics
                    block_out = found.attend(local, v[:, h0:h1]).to(q.dtype)
                else:
                    mem = (found.scores * scale).masked_fill_(~found.valid, floor)
                    scores = torch.cat([local, mem], dim=-1).clamp_(min=floor)
                    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
                    n_local = local.shape[-1]
                    block_out = probs[..., :n_local] @ v[:, h0:h1] + found.mix(probs[..., n_local:])
                if single_block:
                    return block_out.view(bsz, self.num_heads, q_len, d)
                out[:, h0:h1, :, t0:t1] = block_out.view(bsz, h1 - h0, groups, t1 - t0, d)
        return out.view(bsz, self.num_heads, q_len, d)


class LongLlamaDecoderLayer(nn.Module):
    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LongLlamaAttention(config, layer_idx)
        self.mlp = LongLlamaMLP(config)
        self.input_layernorm = LongLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LongLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, window: WindowContext, memory=None):
        attn_out, local_kv = self.self_attn(self.input_layernorm(hidden_states), window, memory)
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, local_kv


class LongLlamaCache(Cache):
    """Generation state: the local cache of every layer plus the memory of every memory layer.

    The local cache holds un-rotated keys/values `[B, H_kv, P, d]` per layer, with their absolute positions and
    padding mask `[B, P]` (shared by all layers). `memories` maps a memory layer index to its memory object.
    `get_seq_length()` counts every token fed so far (memory and local), as `generate` expects.
    """

    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.local_kv = [None] * num_layers
        self.positions = None
        self.mask = None
        self.next_position = None
        self.memories = {}
        self.seen_tokens = 0

    @property
    def local_length(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def clear_local(self) -> None:
        self.local_kv = [None] * len(self.local_kv)
        self.positions = self.mask = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor):
        raise NotImplementedError("LongLlamaCache does not support beam search (`num_beams > 1`); use greedy or sampling.")

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("LongLlamaCache cannot be expanded after it was filled; expand the inputs instead.")

    def batch_select_indices(self, indices: torch.Tensor):
        raise NotImplementedError("LongLlamaCache does not support selecting batch rows.")


class LongLlamaPreTrainedModel(PreTrainedModel):
    config_class = LongLlamaConfig
    config: LongLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongLlamaDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LongLlamaRotaryEmbedding):  # a computed buffer, never stored in checkpoints
            module.inv_freq.copy_(module.compute_inv_freq())

    _can_set_attn_implementation_cached_value = True  # attention reads config._attn_implementation at every call

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs) -> str:
        """"eager" (the official matmul + fp32 softmax) unless "sdpa" is asked for; transformers would pick "sdpa"."""
        if attn_implementation is None:
            return "eager"
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"`attn_implementation` must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}.")
        return attn_implementation

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model creates its own LongLlamaCache

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load an official LongLLaMA folder (`model_type: "longllama"`, no `trust_remote_code` needed) or a plain
        Hugging Face LLaMA folder or GGUF file (`model_type: "llama"`, GQA allowed), whose memory layers are then
        those given as `mem_layers=[...]` (none by default). Config fields passed as keyword arguments
        (`mem_layers`, `mem_dtype`, `mem_attention_grouping`, `last_context_length`, `memory_spec`, ...) override
        the stored config. `training_free=True` first applies `training_free_settings` for the checkpoint's trained
        context (its `max_position_embeddings`) and picks `attn_implementation="sdpa"`; explicit keyword arguments
        still win."""
        training_free = kwargs.pop("training_free", False)
        if training_free and config is not None:
            raise ValueError("`training_free=True` derives a config from the checkpoint's; pass it without `config`.")
        if training_free and kwargs.get("attn_implementation") is None:
            kwargs["attn_implementation"] = "sdpa"
        if config is None:
            fields = set(LongLlamaConfig.__annotations__) | set(LEGACY_MEMORY_FIELDS)
            if "torch_attention" in kwargs:  # the official field, an alias of attn_implementation
                if kwargs.pop("torch_attention") and kwargs.get("attn_implementation") is None:
                    kwargs["attn_implementation"] = "sdpa"
            overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in fields}
            legacy = {key: overrides.pop(key) for key in LEGACY_MEMORY_FIELDS if key in overrides}
            if legacy and "memory_spec" in overrides:
                raise ValueError(f"Pass `memory_spec` alone, not together with {sorted(legacy)}.")
            if legacy:
                overrides["memory_spec"] = legacy_memory_spec(legacy)
            if kwargs.get("gguf_file"):
                # transformers maps GGUF tensor names by model type: load as LLaMA, then convert.
                llama = LlamaForCausalLM.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
                if training_free:
                    overrides = {**training_free_settings(llama.config.max_position_embeddings), **overrides}
                return cls.from_llama(llama, attn_implementation=kwargs.get("attn_implementation"), **overrides)
            config_dict, _ = LongLlamaConfig.get_config_dict(
                pretrained_model_name_or_path, local_files_only=kwargs.get("local_files_only", False)
            )
            if training_free:
                overrides = {**training_free_settings(config_dict["max_position_embeddings"]), **overrides}
            if config_dict.get("model_type") == "llama":
                config = LongLlamaConfig.from_llama_config(config_dict, **overrides)
            else:
                config = LongLlamaConfig.from_dict(config_dict, **overrides)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    @classmethod
    def from_llama(cls, llama_model: nn.Module, attn_implementation: str | None = None, **overrides):
        """Convert a loaded Hugging Face `LlamaForCausalLM` (same weights, memory layers from `overrides`);
        `attn_implementation`: as in `from_pretrained` ("eager" by default, whatever the LLaMA model used)."""
        config = LongLlamaConfig.from_llama_config(llama_model.config, **overrides)
        config._attn_implementation = attn_implementation
        config.dtype = llama_model.dtype
        model = cls(config).to(dtype=llama_model.dtype, device=llama_model.device)
        missing, unexpected = model.load_state_dict(llama_model.state_dict(), strict=False, assign=True)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"`llama_model` does not have LLaMA weights: missing {missing}, unexpected {unexpected}.")
        model.tie_weights()
        return model.eval()


class LongLlamaModel(LongLlamaPreTrainedModel):
    """The LongLLaMA decoder: embeddings, layers (some with memory), final norm."""

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        config.validate_longllama()
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LongLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LongLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LongLlamaRotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def new_memory(self, batch_size: int, device, memory_spec=None, directory=None, verify: bool = True):
        """An empty memory for one memory layer: `memory_spec` (a `knn_index.MemorySpec` or its text form), or the
        config's `memory_spec`; keys and values stored in `mem_dtype`; `directory`: the folder of a `storage=disk`
        memory's files (default: a temporary one), opened if it holds a store (`verify`: every byte's CRC)."""
        spec = self.config.memory_spec if memory_spec is None else memory_spec
        memory = make_memory(spec, batch_size, self.config.num_key_value_heads, self.config.head_dim,
                             dtype=getattr(torch, self.config.mem_dtype), device=device, directory=directory,
                             verify=verify)
        return SinkMemory(memory, self.config.mem_sink_tokens) if self.config.mem_sink_tokens else memory

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LongLlamaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        last_context_length: int | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        crossbatch_contexts: int = 0,
        memory_spec=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run N new tokens through the model, window by window (docs/semantics.md, "Windows" and "Eviction and
        generation").

        logits_to_keep: if > 0, only the hidden states of the last `logits_to_keep` tokens are returned (saves
        memory on very long inputs; the causal LM computes logits of those only).
        memory_spec: how memories created for this call store and search (default: the config's `memory_spec`);
        a cache that already holds memories keeps them.
        crossbatch_contexts: FoT training (docs/semantics.md, "FoT cross-batch training"). If > 0, the input is one
        window per row and each memory layer attends, with gradients, to the un-rotated keys/values of the previous
        `crossbatch_contexts` rows of the batch instead of a memory.
        """
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values") if cache is None else cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            if input_ids.dim() != 2 or input_ids.shape[1] == 0:
                raise ValueError(
                    f"`input_ids` must be a non-empty [batch, seq_len] tensor, got shape {tuple(input_ids.shape)}."
                )
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"`inputs_embeds` must be non-empty [batch, seq_len, hidden], got {tuple(inputs_embeds.shape)}.")
        bsz, num_tokens, _ = inputs_embeds.shape
        device = inputs_embeds.device
        config = self.config
        lctx = config.max_position_embeddings
        last_context_length = check_last_context_length(
            config.last_context_length if last_context_length is None else last_context_length
        )
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        if use_cache is None:
            use_cache = cache is not None or (config.use_cache and not self.training)
        if cache is not None and not use_cache:
            raise ValueError("`use_cache=False` cannot be combined with a `cache`; pass `use_cache=True` or no cache.")
        if use_cache and cache is None:
            cache = LongLlamaCache(config.num_hidden_layers)
        if cache is not None and cache.next_position is not None and cache.next_position.shape[0] != bsz:
            raise ValueError(f"The cache holds {cache.next_position.shape[0]} rows but the input has {bsz}.")

        token_mask = self._token_mask(attention_mask, bsz, num_tokens, cache, device)
        start = cache.next_position if cache is not None and cache.next_position is not None else None
        if start is None:
            start = torch.zeros(bsz, dtype=torch.long, device=device)
        if position_ids is None:
            position_ids = start[:, None] + (token_mask.long().cumsum(-1) - 1).clamp(min=0)
        elif position_ids.shape != (bsz, num_tokens):
            raise ValueError(f"`position_ids` must have shape {(bsz, num_tokens)}, got {tuple(position_ids.shape)}.")

        if crossbatch_contexts:
            if cache is not None or use_cache or num_tokens > lctx:
                raise ValueError(
                    f"`crossbatch_contexts` (FoT training) needs one window per row (at most {lctx} tokens, got "
                    f"{num_tokens}) and no cache (`use_cache=False`)."
                )
            last_context_length = num_tokens
        memories = cache.memories if cache is not None else {}
        for idx in config.mem_layers if not crossbatch_contexts else ():
            if idx not in memories:
                memories[idx] = self.new_memory(bsz, device, memory_spec)

        windows = split_windows(num_tokens, lctx, last_context_length)
        kept_hidden, all_hidden = [], []
        for w, (beg, end) in enumerate(windows):
            is_last = w == len(windows) - 1
            keep_local = use_cache and (is_last or cache.local_length > 0)
            hidden, layer_states = self._run_window(
                inputs_embeds[:, beg:end], position_ids[:, beg:end], token_mask[:, beg:end],
                cache if keep_local else None, memories, lctx, output_hidden_states, crossbatch_contexts,
            )
            if output_hidden_states:
                all_hidden.append(layer_states)
            if logits_to_keep <= 0 or end > num_tokens - logits_to_keep:
                kept_hidden.append(hidden[:, max(0, num_tokens - logits_to_keep - beg) :] if logits_to_keep > 0
                                   else hidden)

        if cache is not None:
            cache.seen_tokens += num_tokens
            cache.next_position = torch.maximum(start, position_ids.max(dim=-1).values + 1)
        hidden_states = torch.cat(kept_hidden, dim=1)
        all_hidden_states = None
        if output_hidden_states:
            all_hidden_states = tuple(torch.cat(per_layer, dim=1) for per_layer in zip(*all_hidden))
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)

    @torch.no_grad()
    def write_memory(self, input_ids: torch.LongTensor, memories: dict) -> None:
        """Feed `input_ids` `[B, N]` into `memories` (memory layer -> memory object) in windows of
        `max_position_embeddings` tokens, as prefix windows are fed: each window attends to itself and the memory,
        then is appended to it. No local cache, no logits."""
        if not memories:
            return
        lctx = self.config.max_position_embeddings
        num_layers = max(memories) + 1  # later layers cannot change what goes into memory
        for beg in range(0, input_ids.shape[1], lctx):
            ids = input_ids[:, beg : beg + lctx]
            positions = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
            mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            self._run_window(self.embed_tokens(ids), positions, mask, None, memories, lctx, False, num_layers=num_layers)

    @staticmethod
    def _token_mask(attention_mask, bsz: int, num_tokens: int, cache, device) -> torch.Tensor:
        """The bool padding mask `[B, N]` of the new tokens (True = real token)."""
        if attention_mask is None:
            return torch.ones(bsz, num_tokens, dtype=torch.bool, device=device)
        seen = cache.seen_tokens if cache is not None else 0
        accepted = sorted({num_tokens, seen + num_tokens})
        if attention_mask.dim() != 2 or attention_mask.shape[0] != bsz or attention_mask.shape[1] not in accepted:
            raise ValueError(
                f"`attention_mask` must have shape [batch={bsz}, length] with length in {accepted} (the new tokens, "
                f"or all tokens seen so far plus the new ones), got {tuple(attention_mask.shape)}."
            )
        return attention_mask[:, -num_tokens:].to(device=device, dtype=torch.bool)

    def _run_window(self, embeds, positions, mask, cache, memories, lctx, output_hidden_states, crossbatch_contexts=0,
                    num_layers=None):
        """One window through every layer (or the first `num_layers`, without the final norm: memory writes only).

        cache is None: the window attends to itself (+ memory) and is then appended to memory.
        cache given: the window joins the local cache; if that would exceed `lctx`, the whole previous local cache
        is first evicted (into memory for memory layers, dropped elsewhere).
        """
        num_new = embeds.shape[1]
        past = None
        if cache is not None:
            if cache.local_length > 0 and cache.local_length + num_new > lctx:
                for idx, memory in memories.items():
                    past_k, past_v = cache.local_kv[idx]
                    memory.add(past_k, past_v, cache.mask)
                cache.clear_local()
            if cache.local_length > 0:
                positions = torch.cat([cache.positions, positions], dim=1)
                mask = torch.cat([cache.mask, mask], dim=1)
                past = cache.local_kv
        num_keys = positions.shape[1]
        relative = positions - positions.min(dim=1, keepdim=True).values
        rope = self.rotary_emb(relative, embeds.dtype)
        columns = torch.arange(num_keys, device=embeds.device)
        causal = columns[None, :] <= columns[num_keys - num_new :, None]
        allowed = (causal[None] & mask[:, None, :])[:, None]
        memory_rope = None
        if self.config.mem_distance is not None:
            distance = torch.full((1, 1), self.config.mem_distance, device=embeds.device)
            memory_rope = self.rotary_emb(distance, embeds.dtype)
        window = WindowContext(rope=rope, allowed=allowed, past=past, mask=mask, crossbatch_contexts=crossbatch_contexts,
                               memory_rope=memory_rope)

        hidden = embeds
        layer_states = [hidden]
        local_kv = [None] * len(self.layers)
        non_memory_seen = 0
        for idx, layer in enumerate(self.layers[:num_layers]):
            memory = memories.get(idx)
            checkpoint = False
            if self.gradient_checkpointing and self.training and idx not in self.config.mem_layers:
                checkpoint = non_memory_seen % self.config.gradient_checkpoint_every_ith == 0
                non_memory_seen += 1
            if checkpoint:
                hidden, local_kv[idx] = self._gradient_checkpointing_func(layer.__call__, hidden, window, None)
            else:
                hidden, local_kv[idx] = layer(hidden, window, memory)
            if output_hidden_states:
                layer_states.append(hidden)
        if num_layers is None:
            hidden = self.norm(hidden)
            layer_states[-1] = hidden  # Hugging Face convention: the last entry is the normed output

        if cache is None:
            for idx, memory in memories.items():
                memory.add(*local_kv[idx], mask)  # every memory layer ran: idx < num_layers
        else:
            cache.local_kv, cache.positions, cache.mask = local_kv, positions, mask
        return hidden, layer_states


class LongLlamaForCausalLM(LongLlamaPreTrainedModel, GenerationMixin):
    """LongLLaMA with a language-modelling head; `generate()` works as for any Hugging Face causal LM."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # only when config.tie_word_embeddings

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self.model = LongLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if self.generation_config is not None and self.generation_config.max_new_tokens is None:
            # Without it, transformers caps the default length at max_position_embeddings (our window length).
            self.generation_config.max_new_tokens = 20

    def _get_stopping_criteria(self, *args, **kwargs):
        # transformers warns when generation passes `max_position_embeddings`; for LongLLaMA that is the window
        # length, and going past it is the point.
        criteria = super()._get_stopping_criteria(*args, **kwargs)
        for criterion in criteria:
            if isinstance(criterion, MaxLengthCriteria):
                criterion.max_position_embeddings = None
        return criteria

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LongLlamaCache | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        last_context_length: int | None = None,
        memory_spec=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits for all input tokens (or the last `logits_to_keep`); `labels` give the full-sequence loss.

        last_context_length: trailing tokens kept in the local cache instead of memory (default: the config's).
        memory_spec: the memory of a new cache (a `knn_index.MemorySpec` or its text form); default the config's.
        Every other argument goes to `LongLlamaModel.forward`: `position_ids`, `inputs_embeds`, `use_cache`,
        `crossbatch_contexts` (FoT cross-batch training), `output_hidden_states`.
        """
        if labels is not None and logits_to_keep:
            raise ValueError("`labels` need the logits of every token; do not combine them with `logits_to_keep`.")
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                             logits_to_keep=logits_to_keep, last_context_length=last_context_length,
                             memory_spec=memory_spec, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


__all__ = [
    "LongLlamaCache",
    "LongLlamaForCausalLM",
    "LongLlamaModel",
    "LongLlamaPreTrainedModel",
    "split_windows",
]
