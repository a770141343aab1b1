"""knn_longllama: LongLLaMA (Focused Transformer) on current transformers, with Faiss kNN memory."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_longllama import LongLlamaConfig
from .demo import load_demo
from .document import Document
from .modeling_longllama import LongLlamaCache, LongLlamaForCausalLM, LongLlamaModel, split_windows

AutoConfig.register("longllama", LongLlamaConfig, exist_ok=True)
AutoModel.register(LongLlamaConfig, LongLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LongLlamaConfig, LongLlamaForCausalLM, exist_ok=True)

__all__ = ["Document", "LongLlamaCache", "LongLlamaConfig", "LongLlamaForCausalLM", "LongLlamaModel", "load_demo",
           "split_windows"]
__version__ = "0.1.0"
