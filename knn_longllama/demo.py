"""The small demo LongLLaMA shipped inside the package (`knn_longllama/demo/`), loaded offline with one call.

    from knn_longllama.demo import load_demo
    model, tokenizer = load_demo()                      # dense memory, as trained
    model, tokenizer = load_demo(mem_layers=[])         # ablation: no memory layers (plain LLaMA)
    model, tokenizer = load_demo(mem_backend="faiss", mem_knn_k=32)

It was trained from scratch on CPU by `experiments/train_demo_model.py` (FoT cross-batch training) on passkey
prompts, key-value lookups and a Jane Austen excerpt; see `knn_longllama/demo/MODEL_CARD.md`. It is a toy: it knows
the passkey task and a little Austen, nothing else.
"""

from __future__ import annotations

import os

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")


def demo_path() -> str:
    """The folder holding the demo checkpoint and tokenizer."""
    return DEMO_DIR


def load_demo(**overrides):
    """Load the demo model and its tokenizer from the package folder, offline.

    Keyword arguments override config fields (`mem_layers`, `mem_backend`, `mem_knn_k`, `mem_dtype`,
    `last_context_length`, ...); `device` and `dtype` are passed on to `from_pretrained`-style placement.
    Returns `(model, tokenizer)` with the model in eval mode.
    """
    from transformers import AutoTokenizer

    from .modeling_longllama import LongLlamaForCausalLM

    if not os.path.isfile(os.path.join(DEMO_DIR, "config.json")):
        raise FileNotFoundError(
            f"The demo checkpoint is missing from {DEMO_DIR}; build it with `python experiments/train_demo_model.py`."
        )
    device = overrides.pop("device", None)
    dtype = overrides.pop("dtype", None)
    kwargs = dict(local_files_only=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = LongLlamaForCausalLM.from_pretrained(DEMO_DIR, **kwargs, **overrides)
    if device is not None:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR, local_files_only=True)
    return model.eval(), tokenizer


__all__ = ["DEMO_DIR", "demo_path", "load_demo"]
