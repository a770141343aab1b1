"""Read a very long document into memory once, then ask it many questions; save and reload the memory.

    doc = Document.read(model, "book.txt", tokenizer)     # or model.read(...)
    doc.ask("Who is Emma's friend?", max_new_tokens=20)
    doc.save("book.memory")                                 # one safetensors file, written atomically
    doc = Document.load("book.memory", model, tokenizer)

Reading streams the text window by window: full windows go straight into memory, so RAM beyond the memory itself
stays bounded. `ask` equals `generate` on the concatenated tokens (document + question): reading only consumes
whole windows that would be prefix windows of the concatenated input, and keeps the rest as pending tokens that
each question feeds again. Every question starts from the read state: its own windows and evictions go to a
private overlay (see `OverlayMemory`), never to the document's memory.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .memory import OverlayMemory
from .modeling_longllama import LongLlamaCache

FORMAT_VERSION = 1
TEXT_CHUNK_CHARS = 1 << 16


def model_fingerprint(model) -> str:
    """What a memory depends on: the architecture and memory settings, and the weights that make memory keys."""
    config = model.config
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rope_theta", "mem_layers", "mem_positionals",
              "mem_dtype", "mem_backend", "mem_index"]
    digest = hashlib.sha256(json.dumps({f: getattr(config, f) for f in fields}, sort_keys=True).encode())
    for idx in config.mem_layers:
        attn = model.model.layers[idx].self_attn
        for proj in (attn.k_proj, attn.v_proj):
            digest.update(proj.weight.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def iter_token_chunks(source, tokenizer) -> Iterator[list[int]]:
    """Token ids of a document, chunk by chunk: a path, a string, token ids, or an iterable of strings.

    Text is tokenized incrementally in pieces of about 64k characters cut after a newline, without special tokens;
    the first piece gets the tokenizer's BOS token if it adds one.
    """
    if isinstance(source, torch.Tensor):
        yield source.flatten().tolist()
        return
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], int):
        yield list(source)
        return
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        texts = _file_pieces(source)
    elif isinstance(source, str):
        texts = [source]
    elif isinstance(source, Iterable):
        texts = source
    else:
        raise ValueError(f"`source` must be a path, a string, token ids or an iterable of strings, got {type(source)}.")
    if tokenizer is None:
        raise ValueError("`tokenizer` is required to read text; pass token ids to read without one.")
    first = True
    for text in texts:
        ids = tokenizer(text, add_special_tokens=first)["input_ids"]
        first = False
        if ids:
            yield ids


def _file_pieces(path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        carry = ""
        while chunk := f.read(TEXT_CHUNK_CHARS):
            text = carry + chunk
            cut = text.rfind("\n") + 1
            if cut == 0:
                carry = text
                continue
            yield text[:cut]
            carry = text[cut:]
        if carry:
            yield carry


class Document:
    """A document in memory: per-layer memories of its full windows plus the pending tail tokens."""

    def __init__(self, model, tokenizer, memories: dict, pending: list[int], num_tokens: int,
                 last_context_length: int):
        self.model, self.tokenizer = model, tokenizer
        self.memories, self.pending = memories, pending
        self.num_tokens, self.last_context_length = num_tokens, last_context_length

    @classmethod
    @torch.no_grad()
    def read(cls, model, source, tokenizer=None, *, last_context_length: int | None = None,
             progress: bool = True) -> "Document":
        """Stream `source` into memory window by window (see module docstring)."""
        config = model.config
        lctx = config.max_position_embeddings
        tail = last_context_length if last_context_length is not None else config.last_context_length
        device = model.device
        memories = {idx: model.model.new_memory(1, device, model.dtype) for idx in config.mem_layers}
        buffer, total = [], 0
        bar = tqdm(desc="reading", unit="tok", disable=not progress)
        for chunk in iter_token_chunks(source, tokenizer):
            buffer.extend(chunk)
            total += len(chunk)
            ready = (len(buffer) - tail) // lctx * lctx  # whole windows that stay prefix windows however it ends
            if ready > 0:
                model.model.write_memory(torch.tensor([buffer[:ready]], device=device), memories)
                del buffer[:ready]
                bar.update(ready)
        bar.close()
        if total == 0:
            raise ValueError("`source` holds no tokens.")
        return cls(model, tokenizer, memories, buffer, total, tail)

    def new_cache(self) -> LongLlamaCache:
        """A generation cache over this document's memory; what it adds goes to a private overlay."""
        cache = LongLlamaCache(self.model.config.num_hidden_layers)
        cache.memories = {idx: OverlayMemory(memory) for idx, memory in self.memories.items()}
        return cache

    @torch.no_grad()
    def ask(self, question, **generate_kwargs):
        """Generate an answer to `question` (text, or token ids) from the read state.

        Returns text for a text question (special tokens skipped), else the new token ids `[1, n]`.
        """
        as_text = isinstance(question, str)
        if as_text:
            if self.tokenizer is None:
                raise ValueError("`question` is text but the document has no tokenizer; pass token ids.")
            question_ids = self.tokenizer(question, add_special_tokens=False)["input_ids"]
        else:
            question_ids = torch.as_tensor(question).flatten().tolist()
        ids = torch.tensor([self.pending + question_ids], device=self.model.device)
        generate_kwargs.setdefault("last_context_length", self.last_context_length)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), cache=self.new_cache(), **generate_kwargs)
        new = out[:, ids.shape[1] :]
        return self.tokenizer.decode(new[0], skip_special_tokens=True) if as_text else new

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the memory of every layer to one safetensors file, atomically (temp file + rename)."""
        tensors = {}
        for idx, memory in self.memories.items():
            for name, tensor in memory.state_dict().items():
                tensors[f"layer{idx}.{name}"] = tensor.detach().cpu().contiguous()
        tensors["pending"] = torch.tensor(self.pending, dtype=torch.int64)
        config = self.model.config
        manifest = {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": model_fingerprint(self.model),
            "backend": config.mem_backend,
            "index": config.mem_index if config.mem_backend == "faiss" else None,
            "mem_layers": list(config.mem_layers),
            "num_tokens": self.num_tokens,
            "last_context_length": self.last_context_length,
            "checksums": {name: _sha256(t) for name, t in tensors.items()},
        }
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"knn_longllama_manifest": json.dumps(manifest)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path, model, tokenizer=None) -> "Document":
        """Load a saved memory; refuses (ValueError) another model or config, corruption, or an unknown version."""
        path = os.fspath(path)
        try:
            tensors = load_file(path)
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ValueError(f"{path!r} is not a readable knn_longllama memory file (truncated or corrupted?): "
                             f"{error}") from error
        if "knn_longllama_manifest" not in metadata:
            raise ValueError(f"{path!r} has no knn_longllama manifest; not a memory saved by Document.save.")
        manifest = json.loads(metadata["knn_longllama_manifest"])
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path!r} has memory format version {manifest.get('format_version')!r}; "
                             f"this version of knn_longllama reads version {FORMAT_VERSION}.")
        if manifest["model_fingerprint"] != model_fingerprint(model):
            raise ValueError(f"{path!r} was made by another model or memory configuration "
                             f"(backend {manifest['backend']!r}, index {manifest['index']!r}, "
                             f"mem_layers {manifest['mem_layers']}); load it with the model that wrote it.")
        for name, digest in manifest["checksums"].items():
            if name not in tensors or _sha256(tensors[name]) != digest:
                raise ValueError(f"{path!r} is corrupted: checksum mismatch for {name!r}.")
        device = model.device
        memories = {}
        for idx in model.config.mem_layers:
            prefix = f"layer{idx}."
            memory = model.model.new_memory(1, device, model.dtype)
            memory.load_state_dict({k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)})
            memories[idx] = memory
        return cls(model, tokenizer, memories, tensors["pending"].tolist(), manifest["num_tokens"],
                   manifest["last_context_length"])


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
