"""Scaling experiments on the demo model: accuracy, time, memory and retrieval quality against context length.

    python experiments/run_experiments.py --scale small     # < 10 minutes on 2 CPU cores
    python experiments/run_experiments.py --scale full      # up to 1M tokens (hours on 2 cores)
    python experiments/run_experiments.py --scale small --only recall ingest

Experiments (each writes experiments/results/<name>_<scale>.{csv,md,png}):
  passkey   passkey accuracy vs context length: dense (up to `dense_max`; "dense sdpa" when only that is asked for)
            vs Faiss indices, k in {8, 32, 128}, plus a depth sweep (where the key sits in the prompt);
            passkey_trials_<scale>.csv has every trial (seed, key, depth of the key line, what the model generated)
  ingest    ingestion time and peak RAM vs context length, dense vs each index (a subprocess per point), with the
            fitted scaling exponent of time in context length; dense memory both as the official matmul + fp32
            softmax ("dense") and as one fused SDPA call ("dense sdpa", where the scale has `dense_sdpa`)
  decode    decode latency per generated token vs memory size
  recall    recall@k of each index against exact top-k on real keys and queries taken from the model, and the share
            of the dense memory attention mass the retrieved entries keep, vs nprobe / efSearch
`experiments/results/environment_<scale>.json` records the machine, package versions and settings, and
`printed_<scale>.txt` what each run printed (appended, after the command line that ran it). The README's
results section is regenerated from these files by `python experiments/update_readme.py`.
"""

import argparse
import contextlib
import csv
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Scale:
    name: str
    passkey_lengths: list
    dense_max: int
    trials: int
    indices: dict  # label -> (factory string, search params)
    ks: list
    depth_length: int
    depths: list
    ingest_lengths: list
    decode_sizes: list
    recall_tokens: int
    recall_sweep: dict = field(default_factory=dict)  # label -> (factory, param name, values[, fixed params])
    dense: bool = True  # include dense memory (up to dense_max)
    dense_sdpa: bool = False  # ingest/decode also time dense memory read with fused SDPA ("dense sdpa")
    k_sweep_max: int | None = None  # Flat's ks other than 32 only up to this length (None: every length)
    seed: int = 0  # passkey prompts: trial i of a seed is the same prompt for every index and k


SCALES = {
    "small": Scale(
        name="small", passkey_lengths=[512, 2048, 8192], dense_max=8192, trials=10,
        indices={"Flat": ("Flat", {}), "IVF64,Flat l2": ("IVF64,Flat", {"nprobe": 8, "faiss_metric": "l2"}),
                 "HNSW32 ef64 l2": ("HNSW32", {"efSearch": 64, "faiss_metric": "l2"}),
                 "IVF64,PQ8x4": ("IVF64,PQ8x4", {"nprobe": 8, "k_factor": 4})},
        ks=[8, 32, 128], depth_length=2048, depths=[0.0, 0.25, 0.5, 0.75, 1.0],
        ingest_lengths=[2048, 8192, 16384], decode_sizes=[2048, 8192, 16384], recall_tokens=12288, k_sweep_max=2048,
        recall_sweep={"IVF64,Flat": ("IVF64,Flat", "nprobe", [1, 2, 4, 8, 16]),
                      "IVF64,Flat l2": ("IVF64,Flat", "nprobe", [1, 2, 4, 8, 16], {"faiss_metric": "l2"}),
                      "HNSW32": ("HNSW32", "efSearch", [16, 32, 64, 128]),
                      "HNSW32 l2": ("HNSW32", "efSearch", [16, 32, 64, 128], {"faiss_metric": "l2"}),
                      # graph quality: Faiss builds HNSW with efConstruction 40 unless told otherwise
                      "HNSW32 l2 ef64": ("HNSW32", "efConstruction", [40, 200], {"faiss_metric": "l2", "efSearch": 64})},
    ),
    # One GPU, a few minutes: `python experiments/run_experiments.py --scale gpu --device cuda --only passkey ingest
    # decode`. "torch" is exact top-k on the GPU (no faiss-gpu needed); Faiss indices run on the GPU with faiss-gpu,
    # otherwise on the CPU with the model on the GPU.
    "gpu": Scale(
        name="gpu", passkey_lengths=[4096, 16384, 65536], dense_max=16384, trials=5,
        indices={"torch": ("torch", {}), "IVF1024,Flat": ("IVF1024,Flat", {"nprobe": 32})},
        ks=[32], depth_length=16384, depths=[0.0, 0.5, 1.0],
        ingest_lengths=[4096, 16384, 65536, 262144], decode_sizes=[1024, 16384, 262144], recall_tokens=65536,
        recall_sweep={"IVF1024,Flat": ("IVF1024,Flat", "nprobe", [1, 8, 32, 128])}, dense_sdpa=True,
    ),
    "full": Scale(
        name="full", passkey_lengths=[4096, 16384, 65536, 262144, 1048576], dense_max=65536, trials=20,
        indices={"Flat": ("Flat", {}), "IVF1024,Flat": ("IVF1024,Flat", {"nprobe": 32}),
                 "IVF1024,Flat nprobe8": ("IVF1024,Flat", {"nprobe": 8}),
                 "IVF1024,Flat l2": ("IVF1024,Flat", {"nprobe": 32, "faiss_metric": "l2"}),
                 "IVF1024,Flat l2 nprobe128": ("IVF1024,Flat", {"nprobe": 128, "faiss_metric": "l2"}),
                 "IVF1024,Flat l2 nprobe128 big_batch": ("IVF1024,Flat", {"nprobe": 128, "faiss_metric": "l2",
                                                                         "faiss_search": "big_batch"}),
                 "HNSW32": ("HNSW32", {"efSearch": 64}), "IVF1024,PQ16": ("IVF1024,PQ16", {"nprobe": 32, "k_factor": 4})},
        ks=[8, 32, 128], depth_length=65536, depths=[0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0],
        ingest_lengths=[4096, 16384, 65536, 262144, 1048576], decode_sizes=[1024, 16384, 131072, 1048576],
        recall_tokens=262144, dense_sdpa=True,
        recall_sweep={"IVF1024,Flat": ("IVF1024,Flat", "nprobe", [1, 4, 16, 32, 64, 128]),
                      "IVF1024,Flat l2": ("IVF1024,Flat", "nprobe", [1, 4, 16, 32, 64, 128], {"faiss_metric": "l2"}),
                      "HNSW32": ("HNSW32", "efSearch", [16, 32, 64, 128, 256]),
                      "HNSW32 l2": ("HNSW32", "efSearch", [16, 32, 64, 128, 256], {"faiss_metric": "l2"}),
                      "HNSW32 l2 ef64": ("HNSW32", "efConstruction", [40, 200, 500], {"faiss_metric": "l2", "efSearch": 64})},
    ),
}


# Dense memory labels, both attending to every memory entry (up to a scale's `dense_max`): the official matmul + fp32
# softmax, and one fused SDPA call over [local ; memory] keys (`torch_attention=True`: the same math, one kernel).
DENSE = {"dense": {"torch_attention": False}, "dense sdpa": {"torch_attention": True}}


# -- helpers -------------------------------------------------------------------------------------------------------
DEVICE = "cpu"  # set from --device in main(); passed on to the subprocesses


def load(**overrides):
    from knn_longllama.demo import load_demo

    return load_demo(device=DEVICE, **overrides)


def memory_settings(label: str, scale: Scale, k: int = 32) -> dict:
    """Config overrides for a memory backend label: one of `DENSE`, or a label of `scale.indices` (factory "torch"
    means exact top-k in torch on the model's device)."""
    if label in DENSE:
        return dict(memory_spec="dense", **DENSE[label])
    factory, params = scale.indices[label]
    return dict(memory_spec=str(memory_spec(factory, params, k)), torch_attention=False)


def memory_spec(factory: str, params: dict, k: int = 32):
    """A `knn_index.MemorySpec` from a scale's (factory, params): `k_factor`, `faiss_metric` and `faiss_search` in
    `params` are the spec's k_factor, metric and scan; the rest are Faiss index parameters."""
    from knn_index import MemorySpec

    params = dict(params)
    options = dict(k_factor=params.pop("k_factor", 1), metric=params.pop("faiss_metric", "ip"),
                   scan=params.pop("faiss_search", "index"))
    return MemorySpec(factory, k=k, index_params=params, **options)


def search_mode(label: str, scale: Scale, config, num_tokens: int) -> str:
    """How memory is searched after reading `num_tokens`: "dense", "exact" (torch top-k, Flat, or a trainable index
    that has not reached its training size: knn_index buffers keys and searches them exactly until then) or
    "approximate" (a trained IVF/PQ index, or HNSW)."""
    if label in DENSE:
        return "dense"
    factory, _ = scale.indices[label]
    if factory == "torch":
        return "exact"
    import knn_index

    index = knn_index.make_index(factory, config.hidden_size // config.num_attention_heads)
    keys_per_head = max(num_tokens - config.last_context_length, 0)  # the final window stays local
    if index.is_trained:  # Flat is exact; HNSW is approximate from the first key
        return "exact" if "Flat" == factory else "approximate"
    return "exact" if keys_per_head < knn_index.default_train_size(index) else "approximate"


def synchronize() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def configure(model, settings: dict) -> None:
    for key, value in settings.items():
        setattr(model.config, key, value)
    model.config.validate_longllama()


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_rows(rows: list[dict], stem: str, title: str) -> None:
    if not rows:
        return
    columns = list(rows[0])
    write_csv(rows, stem + ".csv")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text, flush=True)


def plot(stem: str, series: dict, xlabel: str, ylabel: str, title: str, logx=True, logy=False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log", base=2)
    if logy and all(y > 0 for _, ys in series.values() for y in ys):  # a time rounded to 0 s keeps a linear axis
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=100)
    plt.close(fig)


# -- 1. passkey ----------------------------------------------------------------------------------------------------
def depth_prompt(n_garbage: int, depth: float, rng: random.Random) -> tuple[str, int]:
    from knn_longllama import passkey

    n_prefix = round(depth * n_garbage)
    key = rng.randrange(passkey.KEY_LOW, passkey.KEY_HIGH)
    parts = [passkey.TASK_DESCRIPTION, passkey.repeated_filler(n_prefix), passkey.INFO_TEMPLATE.format(key=key),
             passkey.repeated_filler(n_garbage - n_prefix), passkey.QUESTION]
    return "\n".join(parts), key


def write_passkey(rows: list[dict], scale: Scale) -> None:
    stem = os.path.join(RESULTS, f"passkey_{scale.name}")
    write_rows(rows, stem, f"Passkey accuracy vs context length ({scale.name}, {scale.trials} trials per point)")
    series = {}
    for row in rows:
        name = row["index"] if row["k"] == "-" else f"{row['index']} k={row['k']}"
        series.setdefault(name, ([], []))
        series[name][0].append(row["tokens"])
        series[name][1].append(row["accuracy"])
    plot(stem, series, "context tokens", "passkey accuracy", "Passkey retrieval, demo model")


def trial_rows(result: dict, label: str, k, scale: Scale) -> list[dict]:
    """One row per trial of a `passkey_accuracy` result: its key, where the key line sits (depth: the share of the
    filler before it) and what the model generated."""
    from knn_longllama.passkey import INFO_TEMPLATE, TASK_DESCRIPTION, passkey_prompts

    rows = []
    prompts = passkey_prompts(result["n_garbage"], result["trials"], scale.seed)
    for trial, ((prompt, key), r) in enumerate(zip(prompts, result["results"])):
        n_prefix = prompt.index(INFO_TEMPLATE.format(key=key)) - len(TASK_DESCRIPTION) - 2  # two newlines
        rows.append({"index": label, "k": k or "-", "tokens": result["target_tokens"], "seed": scale.seed,
                     "trial": trial, "key": key, "depth": round(n_prefix / max(result["n_garbage"], 1), 4),
                     "correct": int(r["correct"]), "generated": r["generated_text"].strip()})
    return rows


def passkey_dense_labels(scale: Scale) -> list[str]:
    """The dense variant the passkey sweeps run (at most one; both give the same answers up to float rounding): the
    official "dense", or "dense sdpa" when only that was asked for (`--indices 'dense sdpa' ...`: ~4.6x faster at
    65536 tokens, so dense reaches longer prompts)."""
    return ["dense"] if scale.dense else ["dense sdpa"] if scale.dense_sdpa else []


def exp_passkey(scale: Scale) -> None:
    from knn_longllama.passkey import n_garbage_for_tokens, passkey_accuracy, passkey_trial

    model, tokenizer = load()
    rows, trials = [], []
    dense_labels = passkey_dense_labels(scale)
    configs = [(label, None) for label in dense_labels] + [(label, k) for label in scale.indices for k in (scale.ks if label == "Flat" else [32])]
    for label, k in configs:
        configure(model, memory_settings(label, scale, k or 32))
        for length in scale.passkey_lengths:
            if label in DENSE and length > scale.dense_max:
                continue
            if k not in (None, 32) and scale.k_sweep_max is not None and length > scale.k_sweep_max:
                continue
            result = passkey_accuracy(model, tokenizer, length, trials=scale.trials, seed=scale.seed)
            rows.append({"index": label, "k": k or "-", "tokens": length,
                         "prompt_tokens": round(result["mean_prompt_tokens"]),
                         "search": search_mode(label, scale, model.config, round(result["mean_prompt_tokens"])),
                         "accuracy": result["accuracy"],
                         "trials": scale.trials, "seed": scale.seed, "seconds": round(result["seconds"], 1)})
            print(rows[-1], flush=True)
            write_passkey(rows, scale)  # after every point: an interrupted run keeps what it measured
            trials += trial_rows(result, label, k, scale)
            write_csv(trials, os.path.join(RESULTS, f"passkey_trials_{scale.name}.csv"))

    if not scale.depths:
        return
    depth_rows = []
    n_garbage = n_garbage_for_tokens(tokenizer, scale.depth_length)
    knn_labels = ["Flat"] if "Flat" in scale.indices else list(scale.indices)[:1]
    for label in dense_labels + knn_labels:
        configure(model, memory_settings(label, scale, 32))
        for depth in scale.depths:
            rng = random.Random(f"depth-{depth}")
            correct = 0
            for _ in range(scale.trials):
                prompt, key = depth_prompt(n_garbage, depth, rng)
                correct += passkey_trial(model, tokenizer, prompt, key)["correct"]
            depth_rows.append({"index": label, "tokens": scale.depth_length, "depth": depth,
                               "accuracy": correct / scale.trials, "trials": scale.trials})
    write_rows(depth_rows, os.path.join(RESULTS, f"passkey_depth_{scale.name}"),
               f"Passkey accuracy vs depth of the key ({scale.depth_length} tokens"
               + "".join(f", k=32 for {label}" for label in knn_labels) + ")")


# -- 2. ingestion ----------------------------------------------------------------------------------------------------
def filler_ids(tokenizer, num_tokens: int) -> list[int]:
    from knn_longllama.passkey import repeated_filler

    piece = tokenizer(repeated_filler(20000), add_special_tokens=False)["input_ids"]
    return (piece * (num_tokens // len(piece) + 1))[:num_tokens]


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB. On Linux from VmHWM (the high-water mark of this process's own
    address space): getrusage's ru_maxrss survives fork + exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def read_child(label: str, num_tokens: int, scale_name: str, decode: bool) -> dict:
    """Read `num_tokens` filler tokens into memory (the ingestion row), then, if `decode`, time greedy decoding
    against that memory (the decode row): one read serves both experiments."""
    from knn_longllama.document import Document

    scale = SCALES[scale_name.split("_")[0]]  # a tagged run ("full_1m") uses its base scale's indices
    model, tokenizer = load(**memory_settings(label, scale))
    ids = filler_ids(tokenizer, num_tokens)
    synchronize()
    start = time.perf_counter()
    doc = Document.read(model, ids, progress=False)
    synchronize()
    seconds = time.perf_counter() - start
    ingest = {"index": label, "tokens": num_tokens, "search": search_mode(label, scale, model.config, num_tokens),
              "seconds": round(seconds, 3),
              "us_per_token": round(1e6 * seconds / num_tokens, 2),
              "peak_rss_mb": peak_rss_mb(),
              "memory_mb": round(sum(m.nbytes() for m in doc.memories.values()) / 2**20, 1)}
    if DEVICE.startswith("cuda"):
        ingest["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if not decode:
        return {"ingest": ingest}
    cache = doc.new_cache()
    prompt = torch.tensor([doc.pending + tokenizer(" What is the pass key?", add_special_tokens=False)["input_ids"]],
                          device=model.device)
    times = []
    with torch.no_grad():
        out = model(prompt, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(24):
            synchronize()
            start = time.perf_counter()
            out = model(token, cache=cache, use_cache=True)
            synchronize()
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
    decode_row = {"index": label, "memory_tokens": num_tokens,
                  "ms_per_token": round(1000 * statistics.median(times[4:]), 2),
                  "read_seconds": round(seconds, 2), "peak_rss_mb": peak_rss_mb()}
    return {"ingest": ingest, "decode": decode_row}


THREADS = 2  # set from --threads in main(); passed on to the subprocesses


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args, "--threads", str(THREADS), "--device", DEVICE],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


APPEND = False  # --append: add to the rows already in the results file of the same experiment and scale


def previous_rows(kind: str, scale: Scale) -> list[dict]:
    """Rows of an earlier run of this sweep (numbers parsed back), without its derived columns."""
    path = os.path.join(RESULTS, f"{kind}_{scale.name}.csv")
    if not os.path.exists(path):
        return []
    number = lambda v: float(v) if "." in v else int(v)  # noqa: E731
    with open(path) as f:
        rows = [{key: (v if key in ("index", "search") else number(v)) for key, v in r.items()
                 if key not in ("time_exponent", "vs_smallest")} for r in csv.DictReader(f)]
    return rows


READS = {}  # (scale, label, tokens) -> a read child's rows, so ingest and decode of one run share each read


def read_rows(label: str, n: int, scale: Scale) -> dict:
    key = (scale.name, label, n)
    if key not in READS:
        decode = n in scale.decode_sizes
        READS[key] = run_child(["--child", "read" if decode else "ingest", label, str(n), scale.name])
    return READS[key]


def sweep_children(kind: str, sizes: list, scale: Scale, write) -> list[dict]:
    """One subprocess per (memory backend, size), shared by the ingest and decode sweeps; dense memory only up to
    `dense_max`. `write(rows)` after every point, so an interrupted sweep keeps what it measured."""
    rows = previous_rows(kind, scale) if APPEND else []
    point = lambda r: (r["index"], int(r.get("tokens", r.get("memory_tokens"))))  # noqa: E731
    dense = ["dense"] * scale.dense + ["dense sdpa"] * scale.dense_sdpa
    for label in dense + list(scale.indices):
        for n in sizes:
            if label in DENSE and n > scale.dense_max:
                continue
            row = read_rows(label, n, scale)[kind]
            at = next((i for i, r in enumerate(rows) if point(r) == (label, n)), None)
            if at is None:
                rows.append(row)
            else:  # a re-measured point keeps its place
                rows[at] = row
            order = list(dict.fromkeys(r["index"] for r in rows))
            rows.sort(key=lambda r: (order.index(r["index"]), point(r)[1]))  # a label's points together, by size
            print(row, flush=True)
            write([dict(r) for r in rows])
    return rows


def exp_ingest(scale: Scale) -> None:
    sweep_children("ingest", scale.ingest_lengths, scale, lambda rows: write_ingest(rows, scale))


def write_ingest(rows: list[dict], scale: Scale) -> None:
    for label in {r["index"] for r in rows}:
        points = [(r["tokens"], r["seconds"]) for r in rows if r["index"] == label]
        if len(points) >= 2:
            slope = np.polyfit(np.log([p[0] for p in points]), np.log([p[1] for p in points]), 1)[0]
            for r in rows:
                if r["index"] == label:
                    r["time_exponent"] = round(float(slope), 2)
    for r in rows:
        r.setdefault("time_exponent", "-")
    stem = os.path.join(RESULTS, f"ingest_{scale.name}")
    write_rows(rows, stem, f"Ingestion time and peak RAM vs context length ({scale.name}); time ~ tokens^exponent")
    series = {label: ([r["tokens"] for r in rows if r["index"] == label], [r["seconds"] for r in rows if r["index"] == label])
              for label in dict.fromkeys(r["index"] for r in rows)}
    plot(stem, series, "context tokens", "ingestion time (s)", "Reading into memory", logy=True)


# -- 3. decode latency ------------------------------------------------------------------------------------------------
def exp_decode(scale: Scale) -> None:
    sweep_children("decode", scale.decode_sizes, scale, lambda rows: write_decode(rows, scale))


def write_decode(rows: list[dict], scale: Scale) -> None:
    for label in dict.fromkeys(r["index"] for r in rows):
        base = next(r["ms_per_token"] for r in rows if r["index"] == label)
        for r in rows:
            if r["index"] == label:
                r["vs_smallest"] = round(r["ms_per_token"] / base, 2)
    stem = os.path.join(RESULTS, f"decode_{scale.name}")
    write_rows(rows, stem, f"Decode latency per generated token vs memory size ({scale.name}, median of 20 steps; read_seconds: reading the memory first)")
    series = {label: ([r["memory_tokens"] for r in rows if r["index"] == label],
                      [r["ms_per_token"] for r in rows if r["index"] == label])
              for label in dict.fromkeys(r["index"] for r in rows)}
    plot(stem, series, "memory tokens", "ms per generated token", "Decode latency")


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

    text_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "austen_pride_and_prejudice_excerpt.txt")
    austen = tokenizer(open(text_path, encoding="utf-8").read())["input_ids"]
    austen = (austen * (scale.recall_tokens // len(austen) + 1))[: scale.recall_tokens]
    n_garbage = n_garbage_for_tokens(tokenizer, scale.recall_tokens)
    (prompt, _), = passkey_prompts(n_garbage, trials=1, seed=0)
    return {"austen": austen, "passkey": tokenizer(prompt)["input_ids"]}


def real_keys_and_queries(model, ids: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory keys of memory layer `layer` after reading all but the last window of `ids` ([1, H, M, d]), and
    the queries that layer looks the memory up with while reading the last window ([1, H, Q, d]).

    `layer` must be the first memory layer: its keys and queries are computed from layers that read no memory, so
    they are the same whatever memory backend the model reads with, and reading stops at that layer (later layers
    cannot change them). Reading is linear in `len(ids)`; the dense backend would be quadratic."""
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


def exp_recall(scale: Scale) -> None:
    import knn_index

    model, tokenizer = load(mem_dtype="float32")
    layer = min(model.config.mem_layers)
    sweeps = [(label, factory, "-", [None], {}) for label, (factory, _) in scale.indices.items() if factory != "torch"]
    sweeps += [(label + " sweep", factory, name, values, fixed[0] if fixed else {})
               for label, (factory, name, values, *fixed) in scale.recall_sweep.items()]
    rows, sizes = [], {}
    for text, ids in recall_texts(scale, tokenizer).items():
        queries, keys = real_keys_and_queries(model, ids, layer)
        heads, dim = keys.shape[1], keys.shape[-1]
        sizes[text] = keys.shape[2]
        exact = knn_index.KnnStore(1, heads, dim, "Flat", dtype=torch.float32)
        exact.add(keys, keys)
        attention = torch.softmax((queries @ keys.transpose(-1, -2)) / dim**0.5, dim=-1)  # dense memory attention
        stores = {}  # (factory, build-time params, settings) -> a store filled (and trained) once, searched for every k
        ks = scale.ks if text == "austen" else [32]  # the passkey experiment's k; the k sweep runs on natural text
        for k in ks:
            truth = exact.search(queries, k).ids
            exact_mass = round(attention.topk(k, dim=-1).values.sum(-1).mean().item(), 4)
            for label, factory, param, values, fixed in sweeps:
                for value in values:
                    params = {**fixed, param: value} if value is not None else dict(scale.indices.get(label, (None, {}))[1])
                    spec = memory_spec(factory, params, k)
                    search_params = spec.index_params
                    built = spec.replace(k=1, index_params={name: v for name, v in search_params.items()
                                                             if name not in SEARCH_TIME_PARAMS})
                    key = str(built)
                    store = stores.get(key)
                    if store is None:
                        store = knn_index.KnnStore(1, heads, dim, built, dtype=torch.float32)
                        store.add(keys, keys)
                        stores[key] = store
                    searched = {name: v for name, v in search_params.items() if name in SEARCH_TIME_PARAMS}
                    for h in range(heads):  # this point's search-time parameters on the shared indices
                        knn_index.factory.apply_params(store.faiss_index(0, h), searched)
                    start = time.perf_counter()
                    found = store.search(queries, k).ids
                    search_ms = 1000 * (time.perf_counter() - start)
                    hits = (found[..., :, None] == truth[..., None, :]).any(-1).float().mean().item()
                    kept = attention.gather(-1, found.clamp(min=0)).masked_fill(found < 0, 0).sum(-1).mean().item()
                    rows.append({"text": text, "index": factory, "faiss_metric": spec.metric,
                                 "param": param if value is not None else json.dumps(params),
                                 "value": value if value is not None else "-", "k": k, "recall_at_k": round(hits, 4),
                                 "attention_mass_kept": round(kept, 4), "search_ms": round(search_ms, 1),
                                 "mass_of_exact_topk": exact_mass})
    stem = os.path.join(RESULTS, f"recall_{scale.name}")
    write_rows(rows, stem, f"Retrieval quality on real keys/queries of memory layer {layer} ("
               + ", ".join(f"{text}: {n} keys" for text, n in sizes.items())
               + f" x {heads} heads, {queries.shape[2]} queries per head)")
    series = {}
    for row in rows:
        if row["param"] in ("nprobe", "efSearch") and row["k"] == 32:
            name = f"{row['index']} {row['faiss_metric']} ({row['param']}), {row['text']}"
            series.setdefault(name, ([], []))
            series[name][0].append(row["value"])
            series[name][1].append(row["recall_at_k"])
    if series:
        plot(stem, series, "nprobe / efSearch", "recall@32", "Recall against exact top-32 (real queries)")


# -- main --------------------------------------------------------------------------------------------------------------
class Tee:
    """A stdout that writes to several streams: the terminal, and the run's `printed_<scale>.txt`."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


EXPERIMENTS = {"passkey": exp_passkey, "ingest": exp_ingest, "decode": exp_decode, "recall": exp_recall}


def model_identity() -> dict:
    """Which demo checkpoint made the numbers: sha256 of its weights (first 16 hex digits) and its window."""
    import hashlib

    from knn_longllama.demo import demo_path

    with open(os.path.join(demo_path(), "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    with open(os.path.join(demo_path(), "config.json")) as f:
        config = json.load(f)
    return {"weights_sha256": digest, "window": config["max_position_embeddings"], "mem_layers": config["mem_layers"]}


def environment(scale: Scale, threads: int) -> dict:
    import faiss
    import transformers

    gpu = torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else None
    return {"scale": asdict(scale), "threads": threads, "device": DEVICE, "gpu": gpu, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "faiss": faiss.__version__,
            "numpy": np.__version__, "model": model_identity(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                             "'dense sdpa' for dense memory read with fused SDPA: ingest and decode time both; passkey runs "
                             "'dense sdpa' only when 'dense' is not asked for)")
    parser.add_argument("--ks", type=int, nargs="+", default=None,
                        help="override the scale's k sweep (Flat's passkey ks, recall's ks on natural text)")
    parser.add_argument("--append", action="store_true",
                        help="ingest/decode: add to (or replace points of) the rows already in the results file")
    parser.add_argument("--depths", type=float, nargs="*", default=None,
                        help="override the depth sweep's key depths (no value: skip the depth sweep)")
    parser.add_argument("--tag", default=None, help="results are written as <experiment>_<scale>_<tag>.*")
    parser.add_argument("--device", default="cpu", help="where the model (and exact top-k) runs: cpu, cuda, cuda:1")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import knn_index

    global THREADS, DEVICE, APPEND
    THREADS, DEVICE, APPEND = args.threads, args.device, args.append
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {DEVICE}: torch sees no CUDA device here (use --device cpu)")
    knn_index.set_num_threads(args.threads)
    if args.child:
        kind, label, n, scale_name = args.child  # kind: "ingest" (read only) or "read" (read, then decode)
        print(json.dumps(read_child(label, int(n), scale_name, decode=kind == "read")))
        return
    scale = replace(SCALES[args.scale], indices=dict(SCALES[args.scale].indices))  # overrides below stay local
    if args.indices:
        scale.dense, scale.dense_sdpa = "dense" in args.indices, "dense sdpa" in args.indices
        unknown = sorted(set(args.indices) - set(scale.indices) - set(DENSE))
        if unknown:
            parser.error(f"--indices {' '.join(unknown)}: not an index of scale {scale.name!r}; accepted: "
                         f"{', '.join(DENSE)}, {', '.join(scale.indices)}")
        scale.indices = {label: scale.indices[label] for label in args.indices if label not in DENSE}
    if args.lengths:
        scale.passkey_lengths = scale.ingest_lengths = scale.decode_sizes = sorted(args.lengths)
    if args.trials:
        scale.trials = args.trials
    if args.dense_max:
        scale.dense_max = args.dense_max
    if args.ks:
        scale.ks = args.ks
    scale.seed = args.seed
    if args.depths is not None:
        scale.depths = args.depths
    if args.tag:
        scale.name = f"{scale.name}_{args.tag}"
    os.makedirs(RESULTS, exist_ok=True)
    env_path = os.path.join(RESULTS, f"environment_{scale.name}.json")
    recorded = {}
    if os.path.exists(env_path):
        with open(env_path) as f:
            recorded = json.load(f)
        if "scale" in recorded:  # an older file: one record for the whole scale
            recorded = {}
    for name in args.only or list(EXPERIMENTS):  # one record per experiment: runs of a scale may differ in settings
        record = environment(scale, args.threads)
        if args.append and name in ("ingest", "decode") and name in recorded:  # keep the runs whose rows stay
            earlier = recorded[name]
            record["earlier_runs"] = earlier.pop("earlier_runs", []) + [earlier]
        recorded[name] = record
    with open(env_path, "w") as f:
        json.dump(recorded, f, indent=2)
    with open(os.path.join(RESULTS, f"printed_{scale.name}.txt"), "a") as log:
        log.write(f"\n$ python {shlex.join(sys.argv)}   # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        with contextlib.redirect_stdout(Tee(sys.stdout, log)):
            for name in args.only or list(EXPERIMENTS):
                started = time.time()
                print(f"== {name} ({scale.name})", flush=True)
                EXPERIMENTS[name](scale)
                print(f"== {name} done in {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
