"""Scaling experiments on the demo model: accuracy, time, memory and retrieval quality against context length.

    python -m experiments.run_experiments --scale small     # < 10 minutes on 2 CPU cores
    python -m experiments.run_experiments --scale full      # up to 1M tokens (hours on 2 cores)
    python -m experiments.run_experiments --scale small --only recall ingest

Experiments (each appends rows to experiments/results/results.csv, see experiments/common.py):
  passkey   passkey accuracy vs context length: dense (up to `dense_max`; "dense sdpa" when only that is asked for)
            vs Faiss indices, k in {8, 32, 128}, plus a depth sweep (where the key sits in the prompt); every trial
            is a `passkey_trial` row (seed, key, depth of the key line, what the model generated)
  ingest    ingestion time and peak RAM vs context length, dense vs each index (a subprocess per point); dense memory
            both as the official matmul + fp32 softmax ("dense") and as one fused SDPA call ("dense sdpa", where the
            scale has `dense_sdpa`)
  decode    decode latency per generated token vs memory size
  recall    recall@k of each index against exact top-k on real keys and queries taken from the model, and the share
            of the dense memory attention mass the retrieved entries keep, vs nprobe / efSearch
Each memory setting is passed per call (`memory_spec=`); `--run NAME` labels the run's rows (default: its start time).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from experiments import common

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Scale:
    name: str
    passkey_lengths: list
    dense_max: int
    trials: int
    indices: dict  # label -> memory spec text (its k is set per point)
    ks: list
    depth_length: int
    depths: list
    ingest_lengths: list
    decode_sizes: list
    recall_tokens: int
    recall_sweep: dict = field(default_factory=dict)  # label -> (memory spec text, swept parameter, values)
    dense: bool = True  # include dense memory (up to dense_max)
    dense_sdpa: bool = False  # ingest/decode also time dense memory read with fused SDPA ("dense sdpa")
    k_sweep_max: int | None = None  # Flat's ks other than 32 only up to this length (None: every length)
    seed: int = 0  # passkey prompts: trial i of a seed is the same prompt for every index and k


SCALES = {
    "small": Scale(
        name="small", passkey_lengths=[512, 2048, 8192], dense_max=8192, trials=10,
        indices={"Flat": "Flat", "IVF64,Flat l2": "IVF64,Flat metric=l2 nprobe=8",
                 "HNSW32 ef64 l2": "HNSW32 metric=l2 efSearch=64", "IVF64,PQ8x4": "IVF64,PQ8x4 k_factor=4 nprobe=8"},
        ks=[8, 32, 128], depth_length=2048, depths=[0.0, 0.25, 0.5, 0.75, 1.0],
        ingest_lengths=[2048, 8192, 16384], decode_sizes=[2048, 8192, 16384], recall_tokens=12288, k_sweep_max=2048,
        recall_sweep={"IVF64,Flat": ("IVF64,Flat", "nprobe", [1, 2, 4, 8, 16]),
                      "IVF64,Flat l2": ("IVF64,Flat metric=l2", "nprobe", [1, 2, 4, 8, 16]),
                      "HNSW32": ("HNSW32", "efSearch", [16, 32, 64, 128]),
                      "HNSW32 l2": ("HNSW32 metric=l2", "efSearch", [16, 32, 64, 128]),
                      # graph quality: Faiss builds HNSW with efConstruction 40 unless told otherwise
                      "HNSW32 l2 ef64": ("HNSW32 metric=l2 efSearch=64", "efConstruction", [40, 200])},
    ),
    # One GPU, a few minutes: `--scale gpu --device cuda --only passkey ingest decode`. "torch" is exact top-k on the
    # GPU (no faiss-gpu needed); Faiss indices run on the GPU with faiss-gpu, otherwise on the CPU.
    "gpu": Scale(
        name="gpu", passkey_lengths=[4096, 16384, 65536], dense_max=16384, trials=5,
        indices={"torch": "exact", "IVF1024,Flat": "IVF1024,Flat nprobe=32"},
        ks=[32], depth_length=16384, depths=[0.0, 0.5, 1.0],
        ingest_lengths=[4096, 16384, 65536, 262144], decode_sizes=[1024, 16384, 262144], recall_tokens=65536,
        recall_sweep={"IVF1024,Flat": ("IVF1024,Flat", "nprobe", [1, 8, 32, 128])}, dense_sdpa=True,
    ),
    "full": Scale(
        name="full", passkey_lengths=[4096, 16384, 65536, 262144, 1048576], dense_max=65536, trials=20,
        indices={"Flat": "Flat", "IVF1024,Flat": "IVF1024,Flat nprobe=32",
                 "IVF1024,Flat nprobe8": "IVF1024,Flat nprobe=8",
                 "IVF1024,Flat l2": "IVF1024,Flat metric=l2 nprobe=32",
                 "IVF1024,Flat l2 nprobe128": "IVF1024,Flat metric=l2 nprobe=128",
                 "IVF1024,Flat l2 nprobe128 big_batch": "IVF1024,Flat metric=l2 scan=big_batch nprobe=128",
                 "HNSW32": "HNSW32 efSearch=64", "IVF1024,PQ16": "IVF1024,PQ16 k_factor=4 nprobe=32",
                 "blocks 8x64 sdpa": "exact k=8 block=64"},
        ks=[8, 32, 128], depth_length=65536, depths=[0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0],
        ingest_lengths=[4096, 16384, 65536, 262144, 1048576], decode_sizes=[1024, 16384, 131072, 1048576],
        recall_tokens=262144, dense_sdpa=True,
        recall_sweep={"IVF1024,Flat": ("IVF1024,Flat", "nprobe", [1, 4, 16, 32, 64, 128]),
                      "IVF1024,Flat l2": ("IVF1024,Flat metric=l2", "nprobe", [1, 4, 16, 32, 64, 128]),
                      "HNSW32": ("HNSW32", "efSearch", [16, 32, 64, 128, 256]),
                      "HNSW32 l2": ("HNSW32 metric=l2", "efSearch", [16, 32, 64, 128, 256]),
                      "HNSW32 l2 ef64": ("HNSW32 metric=l2 efSearch=64", "efConstruction", [40, 200, 500])},
    ),
}

# Dense memory labels -> torch_attention, both attending to every memory entry (up to a scale's `dense_max`): the
# official matmul + fp32 softmax, and one fused SDPA call over [local ; memory] keys (the same math, one kernel).
# Any other label ending in " sdpa" also reads with fused SDPA (block retrieval: docs/semantics.md#block-retrieval).
DENSE = {"dense": False, "dense sdpa": True}


def uses_sdpa(label: str) -> bool:
    return DENSE.get(label, label.endswith(" sdpa"))


def label_k(label: str, scale: Scale) -> int:
    """The k a non-Flat label runs with: its spec's own for block retrieval (k blocks), else 32."""
    from knn_index import MemorySpec

    spec = MemorySpec.parse(scale.indices[label])
    return spec.k if spec.block > 1 else 32
PASSKEY_METRICS = ["correct", "trials", "prompt_tokens", "seconds"]


@dataclass
class Run:
    """Where one run's rows go and what measured them; `reads` lets ingest and decode share each read."""

    id: str
    env: str
    device: str = "cpu"
    threads: int = 2
    reads: dict = field(default_factory=dict)

    def append(self, experiment: str, rows: list[dict], metrics: list[str]) -> None:
        common.append_rows(experiment, rows, metrics, self.id, self.env)
        for row in rows if experiment != "passkey_trial" else []:
            print(experiment, row, flush=True)


def load(device: str = "cpu", **overrides):
    from knn_longllama.demo import load_demo

    return load_demo(device=device, **overrides)


def memory_spec(label: str, scale: Scale, k: int | None = None) -> str:
    """The memory spec of a label: "dense" for both dense labels, else the scale's index with `k` (default: the
    label's, `label_k`)."""
    from knn_index import MemorySpec

    if label in DENSE:
        return "dense"
    return str(MemorySpec.parse(scale.indices[label]).replace(k=k or label_k(label, scale)))


def search_mode(memory: str, config, num_tokens: int) -> str:
    """How memory is searched after reading `num_tokens`: "dense", "exact" (exact top-k, Flat, or a trainable index
    that has not reached its training size: knn_index buffers keys and searches them exactly until then) or
    "approximate" (a trained IVF/PQ index, or HNSW)."""
    import knn_index

    spec = knn_index.MemorySpec.parse(memory)
    if spec.kind != "faiss":
        return spec.kind
    index = knn_index.make_index(spec.index, config.hidden_size // config.num_attention_heads)
    keys_per_head = max(num_tokens - config.last_context_length, 0)  # the final window stays local
    if index.is_trained:  # Flat is exact; HNSW is approximate from the first key
        return "exact" if spec.index == "Flat" else "approximate"
    return "exact" if keys_per_head < knn_index.default_train_size(index) else "approximate"


# -- 1. passkey ----------------------------------------------------------------------------------------------------
def trial_rows(result: dict, point: dict) -> list[dict]:
    """One row per trial of a `passkey_accuracy` result: its key, where the key line sits (depth: the share of the
    filler before it) and what the model generated."""
    from knn_longllama.passkey import INFO_TEMPLATE, TASK_DESCRIPTION, passkey_prompts

    rows = []
    prompts = passkey_prompts(result["n_garbage"], result["trials"], point["seed"])
    for trial, ((prompt, key), r) in enumerate(zip(prompts, result["results"])):
        n_prefix = prompt.index(INFO_TEMPLATE.format(key=key)) - len(TASK_DESCRIPTION) - 2  # two newlines
        rows.append(dict(point, trial=trial, key=key, depth=round(n_prefix / max(result["n_garbage"], 1), 4),
                         correct=int(r["correct"]), generated=r["generated_text"].strip()))
    return rows


def passkey_dense_labels(scale: Scale) -> list[str]:
    """The dense variant the passkey sweeps run (at most one; both give the same answers up to float rounding): the
    official "dense", or "dense sdpa" when only that was asked for (faster, so dense reaches longer prompts)."""
    return ["dense"] if scale.dense else ["dense sdpa"] if scale.dense_sdpa else []


def exp_passkey(scale: Scale, run: Run) -> None:
    from knn_longllama.passkey import make_passkey_prompt, n_garbage_for_tokens, passkey_accuracy, passkey_trial

    models = {}  # torch_attention -> (model, tokenizer): the one memory setting kept in the config

    def model_for(label):
        attention = uses_sdpa(label)
        if attention not in models:
            models[attention] = load(run.device, torch_attention=attention)
        return models[attention]

    dense_labels = passkey_dense_labels(scale)
    configs = [(label, None) for label in dense_labels]
    configs += [(label, k) for label in scale.indices for k in (scale.ks if label == "Flat" else
                                                                 [label_k(label, scale)])]
    for label, k in configs:
        model, tokenizer = model_for(label)
        memory = memory_spec(label, scale, k)
        for length in scale.passkey_lengths:
            if label in DENSE and length > scale.dense_max:
                continue
            if k not in (None, 32) and scale.k_sweep_max is not None and length > scale.k_sweep_max:
                continue
            result = passkey_accuracy(model, tokenizer, length, trials=scale.trials, seed=scale.seed,
                                      memory_spec=memory)
            point = dict(scale=scale.name, index=label, k=k or "-", tokens=length, seed=scale.seed, memory_spec=memory)
            run.append("passkey_trial", trial_rows(result, point), ["key", "depth", "correct", "generated"])
            prompt_tokens = round(result["mean_prompt_tokens"])
            run.append("passkey", [dict(point, search=search_mode(memory, model.config, prompt_tokens),
                                        correct=result["correct"], trials=scale.trials, prompt_tokens=prompt_tokens,
                                        seconds=round(result["seconds"], 1))], PASSKEY_METRICS)
    if not scale.depths:
        return
    knn_labels = ["Flat"] if "Flat" in scale.indices else list(scale.indices)[:1]
    for label in dense_labels + knn_labels:
        model, tokenizer = model_for(label)
        n_garbage = n_garbage_for_tokens(tokenizer, scale.depth_length)
        memory = memory_spec(label, scale, 32)
        for depth in scale.depths:
            rng = random.Random(f"depth-{depth}")
            prompts = [make_passkey_prompt(n_garbage, rng, depth=depth) for _ in range(scale.trials)]
            correct = sum(passkey_trial(model, tokenizer, prompt, key, memory_spec=memory)["correct"]
                          for prompt, key in prompts)
            run.append("passkey_depth", [dict(scale=scale.name, index=label, k="-" if label in DENSE else 32,
                                              tokens=scale.depth_length, depth=depth, memory_spec=memory,
                                              correct=correct, trials=scale.trials)], ["correct", "trials"])


# -- 2. ingestion and 3. decode latency -------------------------------------------------------------------------------
def filler_ids(tokenizer, num_tokens: int) -> list[int]:
    from knn_longllama.passkey import repeated_filler

    piece = tokenizer(repeated_filler(20000), add_special_tokens=False)["input_ids"]
    return (piece * (num_tokens // len(piece) + 1))[:num_tokens]


def read_child(memory: str, torch_attention: bool, num_tokens: int, decode: bool, device: str = "cpu") -> dict:
    """Read `num_tokens` filler tokens into memory (the ingestion metrics), then, if `decode`, time greedy decoding
    against that memory (the decode metrics): one read serves both experiments."""
    from knn_longllama.document import Document

    model, tokenizer = load(device, torch_attention=torch_attention)
    ids = filler_ids(tokenizer, num_tokens)
    doc, seconds = common.timed(lambda: Document.read(model, ids, memory_spec=memory, progress=False))
    memory_mb = round(sum(m.nbytes() for m in doc.memories.values()) / 2**20, 1)
    ingest = {"search": search_mode(memory, model.config, num_tokens), "seconds": round(seconds, 3),
              "peak_rss_mb": common.rss_mb(), "memory_mb": memory_mb}
    if device.startswith("cuda"):
        ingest["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if not decode:
        return {"ingest": ingest}
    cache = doc.new_cache()
    prompt = torch.tensor([doc.pending + tokenizer(" What is the pass key?", add_special_tokens=False)["input_ids"]],
                          device=model.device)
    times = []
    with torch.no_grad():
        token = model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for _ in range(24):
            out, step = common.timed(lambda: model(token, cache=cache, use_cache=True))
            times.append(step)
            token = out.logits[:, -1:].argmax(-1)
    return {"ingest": ingest, "decode": {"ms_per_token": round(1000 * statistics.median(times[4:]), 2),
                                         "read_seconds": round(seconds, 2), "peak_rss_mb": common.rss_mb()}}


def run_child(args: list[str], run: Run) -> dict:
    proc = subprocess.run([sys.executable, "-m", "experiments.run_experiments", *args, "--threads", str(run.threads),
                           "--device", run.device], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep_children(kind: str, sizes: list, scale: Scale, run: Run) -> None:
    """One subprocess per (memory setting, size), shared by the ingest and decode sweeps; dense memory only up to
    `dense_max`. Rows are appended after every point, so an interrupted sweep keeps what it measured."""
    dense = ["dense"] * scale.dense + ["dense sdpa"] * scale.dense_sdpa
    for label in dense + list(scale.indices):
        memory = memory_spec(label, scale)
        for n in sizes:
            if label in DENSE and n > scale.dense_max:
                continue
            key = (label, n)
            if key not in run.reads:
                read = "read" if n in scale.decode_sizes else "ingest"
                run.reads[key] = run_child(["--child", read, memory, str(n), str(uses_sdpa(label))], run)
            metrics = run.reads[key][kind]
            run.append(kind, [dict(scale=scale.name, index=label, tokens=n, memory_spec=memory, **metrics)],
                       [m for m in metrics if m != "search"])


def exp_ingest(scale: Scale, run: Run) -> None:
    sweep_children("ingest", scale.ingest_lengths, scale, run)


def exp_decode(scale: Scale, run: Run) -> None:
    sweep_children("decode", scale.decode_sizes, scale, run)


# -- 4. retrieval quality ----------------------------------------------------------------------------------------------
class RecordingMemory:
    """Stands in for the memory of the first memory layer and records what that layer gives it: the keys of every
    window it adds, and the queries it looks up (real queries, not keys). It answers no lookup: the layer's output
    feeds nothing that is recorded (see `real_keys_and_queries`)."""

    def __init__(self):
        self.keys, self.queries = [], None

    def add(self, keys, values, mask):
        self.keys.append(keys.detach().float().cpu())

    def lookup(self, queries, h0, h1):
        self.queries = queries.detach().float().cpu()  # the last window's
        return None


def recall_texts(scale: Scale, tokenizer) -> dict[str, list[int]]:
    """Token ids of the texts whose real keys and queries the recall experiment searches: natural text (an Austen
    excerpt, repeated to length) and a passkey prompt (the seed-0 prompt of the passkey experiment), whose
    repeated filler makes many near-identical keys; both `recall_tokens` long."""
    from knn_longllama.passkey import n_garbage_for_tokens, passkey_prompts

    text_path = ROOT / "experiments" / "data" / "austen_pride_and_prejudice_excerpt.txt"
    austen = tokenizer(text_path.read_text(encoding="utf-8"))["input_ids"]
    austen = (austen * (scale.recall_tokens // len(austen) + 1))[: scale.recall_tokens]
    (prompt, _), = passkey_prompts(n_garbage_for_tokens(tokenizer, scale.recall_tokens), trials=1, seed=0)
    return {"austen": austen, "passkey": tokenizer(prompt)["input_ids"]}


def real_keys_and_queries(model, ids: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory keys of memory layer `layer` after reading all but the last window of `ids` ([1, H, M, d]), and
    the queries that layer looks the memory up with while reading the last window ([1, H, Q, d]).

    `layer` must be the first memory layer: its keys and queries are computed from layers that read no memory, so
    they are the same whatever memory the model reads with, and reading stops at that layer (later layers cannot
    change them). Reading is linear in `len(ids)`; the dense memory would be quadratic."""
    if layer != min(model.config.mem_layers):
        raise ValueError(f"`layer` must be the first memory layer {min(model.config.mem_layers)}, got {layer}")
    if model.config.mem_attention_grouping is not None:
        raise ValueError("`model.config.mem_attention_grouping` must be None (one lookup per window)")
    window = model.config.max_position_embeddings
    recorder = RecordingMemory()
    model.model.write_memory(torch.tensor([ids[:-window]], device=model.device), {layer: recorder})
    keys = torch.cat(recorder.keys, dim=2)  # what the last window's queries see (not their own window, added after)
    model.model.write_memory(torch.tensor([ids[-window:]], device=model.device), {layer: recorder})
    return recorder.queries, keys


SEARCH_TIME_PARAMS = ("nprobe", "efSearch")  # read by Faiss at search time: one built index serves every value


def exp_recall(scale: Scale, run: Run) -> None:
    import knn_index

    model, tokenizer = load(run.device, mem_dtype="float32")
    layer = min(model.config.mem_layers)
    sweeps = [(label, text, "", [""]) for label, text in scale.indices.items()
              if knn_index.MemorySpec.parse(text).kind == "faiss"]
    sweeps += [(label + " sweep", text, param, values) for label, (text, param, values) in scale.recall_sweep.items()]
    for text_name, ids in recall_texts(scale, tokenizer).items():
        queries, keys = real_keys_and_queries(model, ids, layer)
        heads, dim = keys.shape[1], keys.shape[-1]
        exact = knn_index.KnnStore(1, heads, dim, "Flat", dtype=torch.float32)
        exact.add(keys, keys)
        attention = torch.softmax((queries @ keys.transpose(-1, -2)) / dim**0.5, dim=-1)  # dense memory attention
        stores = {}  # built spec -> a store filled (and trained) once, searched for every k and search parameter
        for k in scale.ks if text_name == "austen" else [32]:  # the passkey experiment's k; k sweep on natural text
            truth = exact.search(queries, k).ids
            exact_mass = round(attention.topk(k, dim=-1).values.sum(-1).mean().item(), 4)
            for label, spec_text, param, values in sweeps:
                for value in values:
                    spec = knn_index.MemorySpec.parse(spec_text).replace(k=k)
                    if param:
                        spec = spec.replace(index_params={**spec.index_params, param: value})
                    built = spec.replace(k=1, index_params={name: v for name, v in spec.index_params.items()
                                                             if name not in SEARCH_TIME_PARAMS})
                    if str(built) not in stores:
                        stores[str(built)] = knn_index.KnnStore(1, heads, dim, built, dtype=torch.float32)
                        stores[str(built)].add(keys, keys)
                    store = stores[str(built)]
                    searched = {name: v for name, v in spec.index_params.items() if name in SEARCH_TIME_PARAMS}
                    for h in range(heads):  # this point's search-time parameters on the shared indices
                        knn_index.factory.apply_params(store.faiss_index(0, h), searched)
                    result, seconds = common.timed(lambda: store.search(queries, k))
                    found = result.ids
                    kept = attention.gather(-1, found.clamp(min=0)).masked_fill(found < 0, 0).sum(-1).mean().item()
                    run.append("recall", [dict(
                        scale=scale.name, text=text_name, index=label, k=k, memory_spec=str(spec), sweep=param,
                        sweep_value=value, recall_at_k=round(common.recall(found, truth), 4),
                        attention_mass_kept=round(kept, 4), search_ms=round(1000 * seconds, 1),
                        mass_of_exact_topk=exact_mass, memory_keys=keys.shape[2])],
                        ["recall_at_k", "attention_mass_kept", "search_ms", "mass_of_exact_topk", "memory_keys"])


# -- main --------------------------------------------------------------------------------------------------------------
EXPERIMENTS = {"passkey": exp_passkey, "ingest": exp_ingest, "decode": exp_decode, "recall": exp_recall}


def scale_from_args(args, parser) -> Scale:
    """The scale with this run's overrides (the scale in SCALES is left as it was)."""
    scale = replace(SCALES[args.scale], indices=dict(SCALES[args.scale].indices), seed=args.seed)
    if args.indices:
        scale.dense, scale.dense_sdpa = "dense" in args.indices, "dense sdpa" in args.indices
        unknown = sorted(set(args.indices) - set(scale.indices) - set(DENSE))
        if unknown:
            parser.error(f"--indices {' '.join(unknown)}: not an index of scale {scale.name!r}; accepted: "
                         f"{', '.join(DENSE)}, {', '.join(scale.indices)}")
        scale.indices = {label: scale.indices[label] for label in args.indices if label not in DENSE}
    if args.lengths:
        scale.passkey_lengths = scale.ingest_lengths = scale.decode_sizes = sorted(args.lengths)
    for name in ("trials", "dense_max", "ks", "depths"):
        if getattr(args, name) is not None:
            setattr(scale, name, getattr(args, name))
    return scale


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.run_experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--only", nargs="+", choices=sorted(EXPERIMENTS), default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch + Faiss threads (one knob)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="override the scale's passkey / ingest / decode lengths (e.g. one 1M-token spot check)")
    parser.add_argument("--trials", type=int, default=None, help="override the scale's passkey trials per point")
    parser.add_argument("--dense-max", type=int, default=None,
                        help="override the scale's longest length with dense memory (e.g. one dense point beyond it)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the length sweep's passkey prompts (another seed: other trials, e.g. to split "
                             "one point's trials over processes; the depth sweep keeps its prompts)")
    parser.add_argument("--indices", nargs="+", default=None,
                        help="only these memory labels of the scale ('dense' for dense memory, up to dense_max; "
                             "'dense sdpa' for dense memory read with fused SDPA: ingest and decode time both; "
                             "passkey runs 'dense sdpa' only when 'dense' is not asked for)")
    parser.add_argument("--ks", type=int, nargs="+", default=None,
                        help="override the scale's k sweep (Flat's passkey ks, recall's ks on natural text)")
    parser.add_argument("--depths", type=float, nargs="*", default=None,
                        help="override the depth sweep's key depths (no value: skip the depth sweep)")
    parser.add_argument("--run", "--tag", dest="run", default=None, help="the run's label (default: its start time)")
    parser.add_argument("--device", default="cpu", help="where the model (and exact top-k) runs: cpu, cuda, cuda:1")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import knn_index

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here (use --device cpu)")
    knn_index.set_num_threads(args.threads)
    if args.child:
        kind, memory, n, attention = args.child  # kind: "ingest" (read only) or "read" (read, then decode)
        print(json.dumps(read_child(memory, attention == "True", int(n), kind == "read", args.device)))
        return
    scale = scale_from_args(args, parser)
    run = Run(common.run_id(args.run), common.environment(args.device, args.threads), args.device, args.threads)
    command = shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"run {run.id!r}, environment {run.env}: python -m experiments.run_experiments {command}", flush=True)
    for name in args.only or list(EXPERIMENTS):
        EXPERIMENTS[name](scale, run)


if __name__ == "__main__":
    main()
