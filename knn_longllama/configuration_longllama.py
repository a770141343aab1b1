"""LongLLaMA configuration: every field of the official release, plus GQA and the kNN memory knobs."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from knn_index.spec import MemorySpec

MEM_DTYPES = ("float32", "bfloat16", "float16")
# Memory fields of earlier versions, folded into `memory_spec` when a config or override carries them.
LEGACY_MEMORY_FIELDS = ("mem_backend", "mem_index", "mem_knn_k", "mem_knn_k_factor", "mem_faiss_metric",
                        "mem_faiss_search", "mem_index_params")
LEGACY_BACKENDS = ("dense", "faiss", "torch_topk")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


@strict
class LongLlamaConfig(PreTrainedConfig):
    r"""
    Configuration of a LongLLaMA (Focused Transformer) model.

    The architecture fields are those of Hugging Face LLaMA. The memory fields follow the official release:

    - `max_position_embeddings`: the context window length `lctx` (RoPE table size, window length used to split
      long inputs, and cap on the local generation cache).
    - `last_context_length`: trailing input tokens kept in the local cache instead of going to memory.
    - `mem_layers`: indices of the memory layers (empty = plain LLaMA), or `"all"`.
    - `mem_dtype`: dtype of stored memory keys and values (`"bfloat16"`, `"float16"` or `"float32"`).
    - `mem_positionals`: if false, memory layers use no RoPE at all.
    - `mem_attention_grouping`: `(heads, queries)` chunking of memory-layer attention; changes peak memory only.
    - `torch_attention` (the official field, an alias of `attn_implementation`): true is `"sdpa"`, false `"eager"`.
    - `gradient_checkpoint_every_ith`: with gradient checkpointing on, checkpoint every i-th non-memory layer.

    Added by this project:

    - `num_key_value_heads`: grouped-query attention (defaults to `num_attention_heads`, plain multi-head).
    - `mem_distance`: the RoPE distance at which every query of a memory layer sees every memory entry; null (the
      official scheme) places memory keys at window position 0, so a query at window position p sees them at
      distance p. Needs `mem_positionals`. For checkpoints without FoT training (docs/semantics.md#training-free).
    - `mem_sink_tokens`: the first n tokens of each document, once they leave the local window, are attended by
      every query of the memory layers (as memory entries, beside the retrieved ones) instead of being searched.
    - `attn_implementation` (transformers' own setting): `"eager"` (default, the official math: matmul + fp32
      softmax) or `"sdpa"` (fused attention; in memory layers the local keys and the memory entries are attended
      apart and joined as one softmax through their log-sum-exps, docs/semantics.md#block-retrieval).
    - `memory_spec`: how memory layers store and search their entries, one `knn_index.MemorySpec` in text form:
      `"dense"` (official: attend to the whole memory), `"exact k=32"` (exact top-k in torch) or a Faiss
      `index_factory` string with options, e.g. `"IVF1024,Flat k=32 nprobe=32 metric=l2"`. Validated here;
      `read`, `generate` and `forward` also take a `memory_spec` per call. The fields of earlier versions
      (`mem_backend`, `mem_index`, `mem_knn_k`, `mem_knn_k_factor`, `mem_faiss_metric`, `mem_faiss_search`,
      `mem_index_params`) are still read and folded into it.
    """

    model_type = "longllama"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float | int = 10000.0
    rope_scaling: dict | None = None
    last_context_length: int = 1024
    mem_layers: list[int] | tuple[int, ...] | str | None = None
    mem_positionals: bool = True
    mem_dtype: str = "bfloat16"
    mem_attention_grouping: list[int] | tuple[int, int] | None = None
    gradient_checkpoint_every_ith: int = 1
    memory_spec: str | dict | None = None
    mem_distance: int | None = None
    mem_sink_tokens: int = 0

    def __post_init__(self, **kwargs):
        legacy = {name: kwargs.pop(name) for name in LEGACY_MEMORY_FIELDS if name in kwargs}
        fused = kwargs.pop("torch_attention", False)
        if self.memory_spec is None:
            self.memory_spec = legacy_memory_spec(legacy)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.mem_layers == "all":
            self.mem_layers = list(range(self.num_hidden_layers))
        elif isinstance(self.mem_layers, str):
            raise ValueError(f"`mem_layers` must be a list of layer indices or 'all', got {self.mem_layers!r}.")
        self.mem_layers = [] if self.mem_layers is None else list(self.mem_layers)
        super().__post_init__(**kwargs)
        if fused and self._attn_implementation is None:
            self._attn_implementation = "sdpa"
        self.validate_longllama()

    @property
    def torch_attention(self) -> bool:
        """The official field: whether attention uses fused SDPA (`attn_implementation == "sdpa"`)."""
        return self._attn_implementation == "sdpa"

    @torch_attention.setter
    def torch_attention(self, value: bool) -> None:
        self._attn_implementation = "sdpa" if value else "eager"

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["torch_attention"] = self.torch_attention  # official LongLLaMA code reads this field
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_longllama(self) -> None:
        """Raise a `ValueError` naming the offending field for any setting the model cannot honour."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_key_value_heads` must divide `num_attention_heads` ({self.num_attention_heads}), "
                f"got {self.num_key_value_heads}."
            )
        bad = [i for i in self.mem_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"`mem_layers` must hold layer indices in [0, {self.num_hidden_layers - 1}] "
                f"(num_hidden_layers={self.num_hidden_layers}), got {list(self.mem_layers)}."
            )
        if self.rope_scaling is not None:
            raise ValueError(
                f"`rope_scaling` must be null for LongLLaMA (context is extended by memory, not RoPE scaling), "
                f"got {self.rope_scaling!r}."
            )
        if self.mem_dtype not in MEM_DTYPES:
            raise ValueError(f"`mem_dtype` must be one of {MEM_DTYPES}, got {self.mem_dtype!r}.")
        check_last_context_length(self.last_context_length)
        if self.max_position_embeddings <= 0:
            raise ValueError(
                f"`max_position_embeddings` (the window length) must be a positive int, "
                f"got {self.max_position_embeddings!r}."
            )
        if self.mem_attention_grouping is not None:
            grouping = tuple(self.mem_attention_grouping)
            if len(grouping) != 2 or not all(isinstance(g, int) and g > 0 for g in grouping):
                raise ValueError(
                    "`mem_attention_grouping` must be null or a pair of positive ints (heads, queries), "
                    f"got {self.mem_attention_grouping!r}."
                )
        if self.mem_distance is not None:
            if isinstance(self.mem_distance, bool) or not isinstance(self.mem_distance, int) or \
                    not 0 <= self.mem_distance <= 1 << 24:
                raise ValueError(f"`mem_distance` must be null or an int in [0, 2^24] (a RoPE distance), "
                                 f"got {self.mem_distance!r}.")
            if not self.mem_positionals:
                raise ValueError("`mem_distance` needs `mem_positionals=True` (memory layers without RoPE have no "
                                 "distance to set).")
        if isinstance(self.mem_sink_tokens, bool) or not isinstance(self.mem_sink_tokens, int) or \
                not 0 <= self.mem_sink_tokens <= 1 << 24:
            raise ValueError(f"`mem_sink_tokens` must be an int in [0, 2^24], got {self.mem_sink_tokens!r}.")
        try:
            self.memory_spec = str(MemorySpec.coerce(self.memory_spec))
        except ValueError as error:
            raise ValueError(f"`memory_spec`: {error}") from None
        if self.gradient_checkpoint_every_ith <= 0:
            raise ValueError(
                f"`gradient_checkpoint_every_ith` must be a positive int, got {self.gradient_checkpoint_every_ith!r}."
            )


    @classmethod
    def from_llama_config(cls, llama_config, **overrides) -> "LongLlamaConfig":
        """A LongLLaMA config for the weights of a plain Hugging Face LLaMA config (GQA allowed), with `overrides`
        (e.g. `mem_layers=[...]`) applied. Raises `ValueError` for LLaMA variants this model does not implement."""
        source = llama_config.to_dict() if hasattr(llama_config, "to_dict") else dict(llama_config)
        rope = source.pop("rope_parameters", None) or {}
        rope_scaling = source.pop("rope_scaling", None)
        if rope_scaling is not None or rope.get("rope_type", "default") != "default":
            raise ValueError(
                f"`rope_scaling` / `rope_parameters` must be plain RoPE (rope_type 'default'), got "
                f"{rope_scaling or rope!r}; scaled RoPE variants are not supported."
            )
        hidden, heads = source["hidden_size"], source["num_attention_heads"]
        if source.get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"`head_dim` must equal hidden_size // num_attention_heads ({hidden // heads}), "
                             f"got {source['head_dim']}.")
        for flag in ("attention_bias", "mlp_bias"):
            if source.get(flag):
                raise ValueError(f"`{flag}=True` is not supported (LongLLaMA projections have no biases).")
        fields = set(cls.__annotations__) | {"dtype"}
        kwargs = {key: value for key, value in source.items() if key in fields}
        kwargs["rope_theta"] = rope.get("rope_theta", source.get("rope_theta", 10000.0))
        kwargs.update(overrides)
        return cls(**kwargs)


# The training-free rule (docs/tuning.md#pretrained-checkpoints): windows of TF_WINDOW tokens with half kept local,
# memory in every layer at the official position (the window start), and each query's own 32 nearest memory tokens
# from a per-head IVF index grown with the memory (l2 on augmented keys ranks by inner product; 32 lists searched).
TF_WINDOW = 512
TF_MEMORY = "IVF1024,Flat k=32 nprobe=32 metric=l2 train=grow"


def training_free_settings(trained_context: int) -> dict:
    """Config overrides that let a pretrained LLaMA-family checkpoint, never trained with FoT, read past its trained
    context (`trained_context` tokens, its `max_position_embeddings`) through memory in every layer."""
    if isinstance(trained_context, bool) or not isinstance(trained_context, int) or trained_context < 1:
        raise ValueError(f"trained_context must be a positive int (the checkpoint's max_position_embeddings), "
                         f"got {trained_context!r}")
    window = min(TF_WINDOW, max(1, trained_context // 4))
    return dict(mem_layers="all", max_position_embeddings=window, last_context_length=max(1, window // 2),
                mem_distance=None, mem_sink_tokens=0, memory_spec=TF_MEMORY)


def legacy_memory_spec(fields: dict) -> str:
    """The `memory_spec` text equal to the memory fields of earlier versions (`LEGACY_MEMORY_FIELDS`)."""
    backend = fields.get("mem_backend", "dense")
    if backend not in LEGACY_BACKENDS:
        raise ValueError(f"`mem_backend` must be one of {LEGACY_BACKENDS}, got {backend!r}.")
    if backend == "dense":
        return "dense"
    spec = dict(index="exact" if backend == "torch_topk" else fields.get("mem_index", "Flat"),
                k=fields.get("mem_knn_k", 32))
    if backend == "faiss":
        spec.update(k_factor=fields.get("mem_knn_k_factor", 1), metric=fields.get("mem_faiss_metric", "ip"),
                    scan=fields.get("mem_faiss_search", "index"), index_params=fields.get("mem_index_params") or {})
    try:
        return str(MemorySpec(**spec))
    except ValueError as error:
        raise ValueError(f"`mem_backend`/`mem_index`/`mem_knn_k`...: {error}") from None


def check_last_context_length(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`last_context_length` must be a positive int (tokens kept local), got {value!r}.")
    return value


__all__ = ["LongLlamaConfig", "training_free_settings"]
