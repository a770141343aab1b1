"""Read a very long document into memory once, then ask it many questions; save and reload the memory.

    doc = Document.read(model, tokenizer=tokenizer, path="book.txt", memory_spec="IVF1024,Flat k=32 nprobe=32")
    doc.ask("Who is Emma's friend?", max_new_tokens=20)
    doc.save("book.memory")                                 # one safetensors file, written atomically and fsynced
    doc = Document.load("book.memory", model, tokenizer)    # verified end to end before anything is used

    # keys and values in files under book.d/ (RAM bounded); the saved memory is those files plus book.memory
    doc = Document.read(model, tokenizer=tokenizer, path="book.txt", memory_dir="book.d",
                        memory_spec="IVF1024,PQ16 k=32 k_factor=4 nprobe=32 storage=disk")

Reading streams the text window by window: full windows go straight into memory, so RAM beyond the memory itself
stays bounded. `ask` equals `generate` on the concatenated tokens (document + question): reading only consumes
whole windows that would be prefix windows of the concatenated input, and keeps the rest as pending tokens that
each question feeds again. Every question starts from the read state: its own windows and evictions go to a
private overlay (see `OverlayMemory`, `BlockOverlay`), never to the document's memory.

A memory file is a safetensors file: the tensors of every memory layer (`layer{i}.*`) and the pending tokens, plus a
JSON manifest in the metadata (format version, model fingerprint, memory spec, memory layers, token counts and the
SHA-256 of every tensor) and a digest of that manifest: SHA-256, or HMAC-SHA256 with the key in the environment
variable `KNN_LONGLLAMA_MEMORY_KEY` when it is set. See README, "Safety".

A memory read with `storage=disk` keeps its keys and values in the files of `memory_dir` (a folder per memory layer,
see `knn_index.disk`); its memory file holds the indexes and, in the manifest's `disk` field, that folder (relative to
the memory file) and the SHA-256 of every layer's journal, which records a CRC-32 of every appended byte. Loading
checks the journals against the manifest, then opens the files in place (nothing is copied); `verify_data=True` (the
default) also checks every CRC, reading the files once (docs/sizing.md).
"""

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from knn_index import MemorySpec

from .configuration_longllama import check_last_context_length
from .memory import SinkMemory, overlay
from .parallel import ShardedMemory, current_shard_path, shard_path
from .modeling_longllama import LongLlamaCache

FORMAT_VERSION = 2
TEXT_CHUNK_CHARS = 1 << 16
MANIFEST_KEY, DIGEST_KEY = "knn_longllama_manifest", "knn_longllama_digest"
KEY_ENV = "KNN_LONGLLAMA_MEMORY_KEY"
MANIFEST_FIELDS = {"format_version": int, "model_fingerprint": str, "memory_spec": str, "mem_layers": list,
                   "num_tokens": int, "last_context_length": int, "checksums": dict}
DISK_FIELD = "disk"  # optional manifest field of a storage=disk memory: {"dir": str, "journals": {layer: sha256}}
FINGERPRINT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "hidden_act",
                      "mem_layers", "mem_positionals", "mem_dtype", "mem_distance", "mem_sink_tokens")


def model_fingerprint(model) -> str:
    """SHA-256 of what shapes a memory's keys and values: the architecture fields and every weight up to the last
    memory layer (embeddings, attention, MLPs and norms of layers 0..max(mem_layers))."""
    config = model.config
    digest = hashlib.sha256(json.dumps({f: getattr(config, f) for f in FINGERPRINT_FIELDS}, sort_keys=True).encode())
    last = max(config.mem_layers, default=-1)
    for name, param in model.model.named_parameters():
        parts = name.split(".")
        if parts[0] == "embed_tokens" or (parts[0] == "layers" and int(parts[1]) <= last):
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_output_path(path, *inputs) -> str:
    """`path` as a string if a memory file can be written there: its folder exists, it is not a folder, and it is
    none of `inputs` (never overwrite what is being read). Raises ValueError naming the path otherwise."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"output {path!r}: the folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"output {path!r} is a folder; give a file name such as {os.path.join(path, 'doc.memory')!r}")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"output {path!r}: the folder {folder!r} is not writable")
    for other in inputs:
        if other is not None and os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other):
            raise ValueError(f"output {path!r} is the input file; choose another output path")
    return path


def iter_token_chunks(tokenizer, *, path=None, text=None, ids=None, texts=None) -> Iterator[list[int]]:
    """Token ids of a document, chunk by chunk, from exactly one of a file `path`, a `text`, token `ids` or an
    iterable of `texts`. Text is tokenized incrementally in pieces of about 64k characters cut after a newline,
    without special tokens except the tokenizer's BOS on the first piece."""
    if ids is not None:
        yield ids
        return
    if tokenizer is None:
        raise ValueError("`tokenizer` is required to read text; pass token ids to read without one.")
    pieces = _file_pieces(path) if path is not None else [text] if text is not None else texts
    first = True
    for piece in pieces:
        if not isinstance(piece, str):
            raise ValueError(f"`source` must yield strings, got {type(piece).__name__}")
        chunk = tokenizer(piece, add_special_tokens=first)["input_ids"]
        first = False
        if chunk:
            yield chunk


def _file_pieces(path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        carry = ""
        while True:
            try:
                chunk = f.read(TEXT_CHUNK_CHARS)
            except UnicodeDecodeError as error:
                raise ValueError(f"path {os.fspath(path)!r} is not UTF-8 text: {error.reason} at byte {error.start} "
                                 "of a chunk") from None
            if not chunk:
                break
            text = carry + chunk
            cut = text.rfind("\n") + 1
            if cut == 0:
                carry = text
                continue
            yield text[:cut]
            carry = text[cut:]
        if carry:
            yield carry


def _source_kwargs(source, path, text, vocab_size: int) -> dict:
    """Exactly one source, as keyword arguments of `iter_token_chunks`."""
    if sum(x is not None for x in (source, path, text)) != 1:
        raise ValueError("Give exactly one of `source` (a Path, token ids or an iterable of strings), `path=` or "
                         "`text=`.")
    if isinstance(source, str):
        raise ValueError("A str `source` is ambiguous: pass `path=` to read a file or `text=` to read the string.")
    if isinstance(source, os.PathLike):
        path = source
    if path is not None:
        if not os.path.exists(path):
            raise ValueError(f"path {os.fspath(path)!r} does not exist")
        if not os.path.isfile(path):
            raise ValueError(f"path {os.fspath(path)!r} is not a regular file")
        return dict(path=path)
    if text is not None:
        if not isinstance(text, str):
            raise ValueError(f"`text` must be a str, got {type(text).__name__}")
        return dict(text=text)
    if isinstance(source, torch.Tensor) or (isinstance(source, (list, tuple)) and source and
                                            all(isinstance(i, int) for i in source)):
        return dict(ids=token_ids(source, vocab_size))
    if isinstance(source, Iterable) and not isinstance(source, (bytes, dict)):
        return dict(texts=source)
    raise ValueError(f"`source` must be a Path, token ids or an iterable of strings, got {type(source).__name__}; "
                     "pass `path=` or `text=` for a file or a string.")


def token_ids(ids, vocab_size: int) -> list[int]:
    """`ids` (a tensor or a list of ints, any shape) as a flat list, checked to lie in [0, vocab_size)."""
    try:
        t = torch.as_tensor(ids).flatten()
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or \
            (t.numel() and (t.min() < 0 or t.max() >= vocab_size)):
        raise ValueError(f"token ids must be integers in [0, {vocab_size}) (the model's vocab_size)")
    return t.tolist()


class Document:
    """A document in memory: per-layer memories of its full windows plus the pending tail tokens."""

    def __init__(self, model, tokenizer, memories: dict, pending: list[int], num_tokens: int,
                 last_context_length: int, memory_spec: str, memory_dir: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.memories, self.pending = memories, pending
        self.num_tokens, self.last_context_length = num_tokens, last_context_length
        self.memory_spec, self.memory_dir = memory_spec, memory_dir

    def close(self) -> None:
        """Close the files of a `storage=disk` memory (a temporary folder is removed); nothing to do in RAM."""
        for memory in self.memories.values():
            store = _knn_store(memory)
            if store is not None:
                store.close()

    @classmethod
    @torch.no_grad()
    def read(cls, model, source=None, tokenizer=None, *, path=None, text=None, memory_spec=None,
             last_context_length: int | None = None, progress: bool = True,
             context_parallel: bool = False, memory_dir=None) -> "Document":
        """Stream a document into memory window by window (see the module docstring).

        The document is one of: `path=` (a UTF-8 text file), `text=` (a string), or `source`: a `pathlib.Path`,
        token ids (tensor or list of ints) or an iterable of strings. A plain `str` source is refused: it could be
        either a path or text. `memory_spec` (default: the model config's) says how memory layers store and search.
        `context_parallel`: shard the memory across the ranks of the initialised torch.distributed group (every
        rank reads the same document; see `knn_longllama.parallel`). `memory_dir`: the folder (created if missing,
        and holding no memory yet) where a `storage=disk` memory keeps its files, one sub-folder per memory layer;
        default a temporary folder removed by `close()` (such a document cannot be saved). When the number of tokens
        is known (token ids), every memory reserves room for them first: RAM storage allocates it exactly, disk
        storage checks the free space (OSError if it is short).
        """
        config = model.config
        lctx = config.max_position_embeddings
        tail = check_last_context_length(config.last_context_length if last_context_length is None
                                         else last_context_length)
        source_kwargs = _source_kwargs(source, path, text, config.vocab_size)
        chunks = iter_token_chunks(tokenizer, **source_kwargs)
        spec = MemorySpec.coerce(config.memory_spec if memory_spec is None else memory_spec)
        device = model.device
        dirs = _layer_dirs(memory_dir, spec, config.mem_layers, context_parallel)
        if any(d is not None and os.path.exists(os.path.join(d, "journal")) for d in dirs.values()):
            raise ValueError(f"memory_dir {os.fspath(memory_dir)!r} already holds a memory; choose an empty folder")
        memories = {idx: model.model.new_memory(1, device, spec, directory=dirs[idx]) for idx in config.mem_layers}
        known = len(source_kwargs.get("ids") or ())
        if known - tail >= lctx:
            for store in filter(None, map(_knn_store, memories.values())):
                store.reserve((known - tail) // lctx * lctx)
        if context_parallel:
            if config.mem_sink_tokens:
                raise ValueError("context_parallel does not support mem_sink_tokens > 0 yet; set mem_sink_tokens=0")
            memories = {idx: ShardedMemory(memory) for idx, memory in memories.items()}
        buffer, total = [], 0
        with tqdm(desc="reading", unit="tok", disable=not progress) as bar:
            for chunk in chunks:
                buffer.extend(chunk)
                total += len(chunk)
                ready = (len(buffer) - tail) // lctx * lctx  # whole windows that stay prefix windows however it ends
                for beg in range(0, max(ready, 0), lctx):
                    model.model.write_memory(torch.tensor([buffer[beg:beg + lctx]], device=device), memories)
                    bar.update(lctx)
                if ready > 0:
                    del buffer[:ready]
        if total == 0:
            raise ValueError("the document holds no tokens")
        return cls(model, tokenizer, memories, buffer, total, tail, str(spec),
                   None if memory_dir is None else os.path.abspath(os.fspath(memory_dir)))

    def new_cache(self) -> LongLlamaCache:
        """A generation cache over this document's memory; what it adds goes to a private overlay."""
        cache = LongLlamaCache(self.model.config.num_hidden_layers)
        cache.memories = {idx: memory.with_base(overlay(memory.base)) if isinstance(memory, SinkMemory)
                          else overlay(memory) for idx, memory in self.memories.items()}
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
            question_ids = token_ids(question, self.model.config.vocab_size)
        ids = torch.tensor([self.pending + question_ids], device=self.model.device)
        if ids.shape[1] == 0:
            raise ValueError("`question` is empty and nothing of the document is pending")
        generate_kwargs.setdefault("last_context_length", self.last_context_length)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), cache=self.new_cache(), **generate_kwargs)
        new = out[:, ids.shape[1] :]
        return self.tokenizer.decode(new[0], skip_special_tokens=True) if as_text else new

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the memory of every layer to one safetensors file: a temporary file in the same folder, fsynced,
        renamed over `path`, then the folder fsynced. The file gets the permissions the umask gives."""
        path = check_output_path(path)
        if any(isinstance(memory, ShardedMemory) for memory in self.memories.values()):
            path = shard_path(path, dist.get_rank(), dist.get_world_size())
        disk = None
        if MemorySpec.coerce(self.memory_spec).storage == "disk":
            if self.memory_dir is None:
                raise ValueError("this document's disk memory lives in a temporary folder; read it with "
                                 "memory_dir= to save it")
            for memory in self.memories.values():
                _knn_store(memory).flush()
            folder = os.path.dirname(os.path.abspath(path))
            disk = {"dir": os.path.relpath(self.memory_dir, folder),
                    "journals": {str(idx): _knn_store(m).journal_sha256() for idx, m in self.memories.items()}}
        tensors = {}
        for idx, memory in self.memories.items():
            for name, tensor in memory.state_dict().items():
                tensors[f"layer{idx}.{name}"] = tensor.detach().cpu().contiguous()
        tensors["pending"] = torch.tensor(self.pending, dtype=torch.int64)
        manifest = json.dumps({
            "format_version": FORMAT_VERSION,
            "model_fingerprint": model_fingerprint(self.model),
            "memory_spec": self.memory_spec,
            "mem_layers": list(self.model.config.mem_layers),
            "num_tokens": self.num_tokens,
            "last_context_length": self.last_context_length,
            "checksums": {name: _sha256(t) for name, t in tensors.items()},
            **({} if disk is None else {DISK_FIELD: disk}),
        }, sort_keys=True)
        _atomic_save(tensors, path, {MANIFEST_KEY: manifest, DIGEST_KEY: _digest(manifest)})

    @classmethod
    def load(cls, path, model, tokenizer=None, *, context_parallel: bool = False,
             verify_data: bool = True) -> "Document":
        """Load a saved memory, verified end to end before use: the manifest digest (or HMAC), every tensor's
        checksum (no tensor missing or extra), the model fingerprint, and every manifest field and tensor against
        the model and the memory spec. Anything else raises ValueError naming the file. `context_parallel`: load
        this rank's shard of a memory saved by as many processes (see `knn_longllama.parallel`). A `storage=disk`
        memory: every layer's journal must match the manifest, then its files are opened in place; `verify_data`
        also checks the CRC of every appended byte (reads the files once; False skips that for a quick load)."""
        path = os.fspath(path)
        if context_parallel:
            path = current_shard_path(path)
        if not os.path.isfile(path):
            raise ValueError(f"memory file {path!r} does not exist" if not os.path.exists(path) else
                             f"memory file {path!r} is not a regular file")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(path)
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise ValueError(f"{path!r} is not a readable knn_longllama memory file (truncated or corrupted?): "
                             f"{error}") from None
        try:
            manifest = _verified_manifest(metadata, tensors)
            dirs = _verified_disk(manifest, path, context_parallel)
            return cls._from_verified(manifest, tensors, model, tokenizer, context_parallel, dirs, verify_data)
        except ValueError as error:
            raise ValueError(f"{path!r}: {error}") from None

    @classmethod
    def _from_verified(cls, manifest: dict, tensors: dict, model, tokenizer, context_parallel: bool,
                       dirs: dict | None = None, verify_data: bool = True) -> "Document":
        config = model.config
        if manifest["model_fingerprint"] != model_fingerprint(model):
            raise ValueError(f"made by another model or memory configuration (mem_layers {manifest['mem_layers']}, "
                             f"memory_spec {manifest['memory_spec']!r}); load it with the model that wrote it")
        if manifest["mem_layers"] != list(config.mem_layers):
            raise ValueError(f"memory layers {manifest['mem_layers']} differ from the model's {config.mem_layers}")
        spec = str(MemorySpec.coerce(manifest["memory_spec"]))
        if (MemorySpec.coerce(spec).storage == "disk") != (dirs is not None):
            raise ValueError(f"memory spec '{spec}' and the manifest's {DISK_FIELD!r} field disagree")
        tail, num_tokens = manifest["last_context_length"], manifest["num_tokens"]
        lctx = config.max_position_embeddings
        pending = tensors.pop("pending", None)
        if pending is None or pending.dtype != torch.int64 or pending.dim() != 1:
            raise ValueError("the tensor 'pending' must be int64 token ids of one dimension")
        pending = token_ids(pending, config.vocab_size)
        unknown = [name for name in tensors if not any(name.startswith(f"layer{i}.") for i in config.mem_layers)]
        if unknown:
            raise ValueError(f"holds tensors of no memory layer: {unknown}")
        memories = {}
        for idx in config.mem_layers:
            prefix = f"layer{idx}."
            if dirs is None:
                memory = model.model.new_memory(1, model.device, spec)
            else:
                memory = model.model.new_memory(1, model.device, spec, directory=dirs[idx], verify=verify_data)
            if context_parallel:
                memory = ShardedMemory(memory)
            elif f"{prefix}shard" in tensors:
                raise ValueError(f"a shard of a context-parallel memory (rank, world size: "
                                 f"{tensors[prefix + 'shard'][:2].tolist()}); load it with context_parallel=True")
            memory.load_state_dict({k[len(prefix):]: v.to(model.device) for k, v in tensors.items()
                                    if k.startswith(prefix)})
            if len(memory) + len(pending) != num_tokens:
                raise ValueError(f"layer {idx} holds {len(memory)} tokens and {len(pending)} are pending, but the "
                                 f"manifest says num_tokens={num_tokens}")
            if context_parallel and (len(memory.local) != memory.local_windows() * lctx or
                                     memory.windows * lctx != num_tokens - len(pending)):
                raise ValueError(f"layer {idx}: the shard holds {len(memory.local)} tokens of {memory.windows} "
                                 f"windows, which is not this rank's share of {num_tokens - len(pending)} tokens "
                                 f"in windows of {lctx}")
            memories[idx] = memory
        stored = num_tokens - len(pending)
        if stored % lctx or not min(num_tokens, tail) <= len(pending) < tail + lctx:
            raise ValueError(f"{stored} tokens in memory and {len(pending)} pending are not a read state for "
                             f"windows of {lctx} and last_context_length={tail}")
        return cls(model, tokenizer, memories, pending, num_tokens, tail, spec,
                   None if dirs is None else os.path.dirname(next(iter(dirs.values()), "")) or None)


def _knn_store(memory):
    """What holds a memory's keys and values (through sink and shard wrappers): a kNN memory's `knn_index.KnnStore`
    or a block memory's storage (both reserve, flush, close and, on disk, give their journal's digest), or None."""
    while not hasattr(memory, "store"):
        memory = getattr(memory, "base", None) or getattr(memory, "local", None)
        if memory is None:
            return None
    return memory.store


def _layer_dirs(memory_dir, spec: MemorySpec, mem_layers, context_parallel: bool) -> dict:
    """Per memory layer, the folder of its files (None: in RAM or a temporary folder)."""
    if memory_dir is None:
        return {idx: None for idx in mem_layers}
    if spec.storage != "disk":
        raise ValueError(f"memory_dir={os.fspath(memory_dir)!r} is the folder of a storage=disk memory; memory spec "
                         f"'{spec}' keeps its entries in RAM")
    if context_parallel:
        raise ValueError("memory_dir: a context-parallel memory cannot be stored on disk yet; drop memory_dir or "
                         "context_parallel")
    memory_dir = os.fspath(memory_dir)
    if os.path.exists(memory_dir) and not os.path.isdir(memory_dir):
        raise ValueError(f"memory_dir {memory_dir!r} is not a folder")
    return {idx: os.path.join(os.path.abspath(memory_dir), f"layer{idx}") for idx in mem_layers}


def _verified_disk(manifest: dict, path: str, context_parallel: bool) -> dict | None:
    """Per memory layer, the folder of a disk memory's files, once each layer's journal matches the manifest;
    None for a memory held in the file."""
    disk = manifest.get(DISK_FIELD)
    if disk is None:
        return None
    layers = [str(i) for i in manifest["mem_layers"]]
    if not isinstance(disk, dict) or set(disk) != {"dir", "journals"} or not isinstance(disk["dir"], str) or \
            not isinstance(disk["journals"], dict) or sorted(disk["journals"]) != sorted(layers):
        raise ValueError(f"the manifest's {DISK_FIELD!r} field must hold 'dir' and the journal digest of every "
                         "memory layer")
    if context_parallel:
        raise ValueError("a disk memory is not context-parallel; load it with context_parallel=False")
    folder = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), disk["dir"]))
    dirs = {}
    for layer in layers:
        journal = os.path.join(folder, f"layer{layer}", "journal")
        if not os.path.isfile(journal):
            raise ValueError(f"its disk memory {journal!r} is missing (the memory's folder {disk['dir']!r} is kept "
                             "relative to the memory file)")
        with open(journal, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if not hmac.compare_digest(digest, str(disk["journals"][layer])):
            raise ValueError(f"{journal!r} differs from the journal saved in the manifest: the files changed after "
                             "the save (appended to, truncated or corrupted)")
        dirs[int(layer)] = os.path.dirname(journal)
    return dirs


def _verified_manifest(metadata: dict, tensors: dict) -> dict:
    """The manifest, once its digest, schema and every tensor checksum are verified."""
    if MANIFEST_KEY not in metadata:
        raise ValueError("no knn_longllama manifest; not a memory saved by Document.save")
    text = metadata[MANIFEST_KEY]
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"the manifest is not valid JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"the manifest must be a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        hint = "; its manifest is not covered by a digest, so read the document again" if version == 1 else ""
        raise ValueError(f"memory format version {version!r}; this version of knn_longllama reads version "
                         f"{FORMAT_VERSION}{hint}")
    scheme, _, stored = metadata.get(DIGEST_KEY, "").partition(":")
    key = os.environ.get(KEY_ENV)
    if scheme == "hmac-sha256" and not key:
        raise ValueError(f"the file is signed with a key; set {KEY_ENV} to the key it was saved with")
    if scheme == "sha256" and key:
        raise ValueError(f"the file is not signed, and {KEY_ENV} is set: only files signed with that key load")
    if scheme not in ("sha256", "hmac-sha256") or not hmac.compare_digest(stored, _digest(text).partition(":")[2]):
        raise ValueError("the manifest does not match its digest (edited or corrupted)" if scheme != "hmac-sha256"
                         else f"the manifest does not match its HMAC (edited, or signed with another {KEY_ENV})")
    if set(manifest) - {DISK_FIELD} != set(MANIFEST_FIELDS) or any(
            not isinstance(manifest[f], t) or isinstance(manifest[f], bool) for f, t in MANIFEST_FIELDS.items()):
        raise ValueError(f"the manifest must hold exactly {', '.join(MANIFEST_FIELDS)} with types "
                         f"{[t.__name__ for t in MANIFEST_FIELDS.values()]}")
    if manifest["num_tokens"] < 1 or manifest["last_context_length"] < 1 or \
            not all(isinstance(i, int) and not isinstance(i, bool) for i in manifest["mem_layers"]):
        raise ValueError("the manifest's num_tokens and last_context_length must be positive and mem_layers ints")
    checksums = manifest["checksums"]
    if set(checksums) != set(tensors):
        raise ValueError(f"every tensor must have a checksum: missing for {sorted(set(tensors) - set(checksums))}, "
                         f"no tensor for {sorted(set(checksums) - set(tensors))}")
    for name, tensor in tensors.items():
        if not hmac.compare_digest(str(checksums[name]), _sha256(tensor)):
            raise ValueError(f"corrupted: checksum mismatch for {name!r}")
    return manifest


def _digest(text: str) -> str:
    """"hmac-sha256:<hex>" of `text` with the key in KNN_LONGLLAMA_MEMORY_KEY when set, else "sha256:<hex>"."""
    key = os.environ.get(KEY_ENV)
    if key:
        return "hmac-sha256:" + hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest()
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _atomic_save(tensors: dict, path: str, metadata: dict) -> None:
    folder, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.tmp-"
    for stale in os.listdir(folder):  # left by a save that was killed: its process is gone
        pid = stale[len(prefix):].partition("-")[0]
        if stale.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            os.remove(os.path.join(folder, stale))
    tmp = os.path.join(folder, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as error:
            raise OSError(f"cannot write the memory file {path!r}: {error}") from None
        publish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish_file(tmp: str, path: str) -> None:
    """Make the written file `tmp` the file `path`, durably: fsync it, give it the permissions the umask gives,
    rename it over `path` (same folder) and fsync the folder."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
