"""knn_longllama: LongLLaMA (Focused Transformer) on current transformers, with Faiss kNN memory."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_longllama import LongLlamaConfig
from .modeling_longllama import LongLlamaCache, LongLlamaForCausalLM, LongLlamaModel, split_windows

AutoConfig.register("longllama", LongLlamaConfig, exist_ok=True)
AutoModel.register(LongLlamaConfig, LongLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LongLlamaConfig, LongLlamaForCausalLM, exist_ok=True)

__all__ = ["LongLlamaCache", "LongLlamaConfig", "LongLlamaForCausalLM", "LongLlamaModel", "split_windows"]
__version__ = "0.1.0"
