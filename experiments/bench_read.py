"""What reading through kNN memory costs over the bare model: a model reading N tokens, as a multiple of the floor.

The floor is the same windows through the same model with no memory layers (one forward of N tokens, all windows,
no cache). Each memory spec reads the same N filler tokens with `Document.read` in the same process and threads,
right after its floor, so each ratio compares like with like.

    python -m experiments.bench_read                                   # the demo: 65536 and 262144 tokens, ~15 min
    python -m experiments.bench_read --tokens 16384 --memory "IVF1024,Flat k=32 nprobe=8 train=grow"
    python -m experiments.bench_read --tokens 1048576 --memory "IVF1024,Flat k=32 nprobe=8 train=grow"  # ~10 min
    python -m experiments.bench_read --model smollm2 --tokens 8192 32768 131072   # the training-free rule's memory
    python -m experiments.bench_read --model smollm2 --attn-implementation eager --tokens 8192
    python -m experiments.bench_read --model smollm2 --tokens 32768 --memory "IVF1024,Flat k=32 nprobe=32 metric=l2 \
        train=grow" --set mem_distance=null mem_sink_tokens=0

`--model` takes what the CLI takes (demo, smollm2, a .gguf file, a folder); without `--memory` a pretrained model
reads with its own `memory_spec` (smollm2: the training-free rule); `--set FIELD=VALUE` overrides config fields
(VALUE parsed as JSON), as `python -m experiments.ruler` does. Rows go to experiments/results/results.csv
(experiment bench_read): seconds, tokens/s, x_floor, peak RSS, and the process's CPU seconds with their ratio
x_floor_cpu (steadier than wall time when other jobs share the cores), with the model and its attention
implementation and the overrides (column `settings`).
"""

import argparse
import time

import torch

from experiments import common

METRICS = ["seconds", "x_floor", "tokens_per_s", "cpu_seconds", "x_floor_cpu", "peak_rss_mb", "memory_mb"]
SPECS = ["IVF1024,Flat k=32 nprobe=8", "IVF1024,Flat k=32 nprobe=8 train=grow",
         "IVF1024,Flat k=32 nprobe=32 metric=l2 train=grow"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.bench_read", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[65536, 262144])
    p.add_argument("--model", default="demo", help="demo (default), smollm2, a .gguf file or a checkpoint folder")
    p.add_argument("--attn-implementation", choices=["eager", "sdpa"], default=None,
                   help="the model's attention (default: the model's own: eager for the demo, sdpa training-free)")
    p.add_argument("--memory", nargs="+", default=None,
                   help="memory specs to read with (default: three IVF settings for the demo, the model's own spec "
                        "otherwise)")
    p.add_argument("--set", type=common.config_override, nargs="+", default=[], metavar="FIELD=VALUE",
                   help="config overrides of the model with memory, e.g. mem_distance=null (values parsed as JSON)")
    p.add_argument("--floor-repeats", type=int, default=3, help="the floor is the fastest of this many runs")
    p.add_argument("--threads", type=int, default=1, help="knn_index.set_num_threads (torch and faiss)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--run", default=None, help="the run's label (default: its start time)")
    args = p.parse_args(argv)
    if min(*args.tokens, args.floor_repeats, args.threads) < 1:
        p.error("--tokens, --floor-repeats and --threads must be positive")
    return args


def filler_ids(tokenizer, n: int) -> torch.Tensor:
    from knn_longllama.passkey import repeated_filler

    ids = tokenizer(repeated_filler(6 * n))["input_ids"][:n]
    if len(ids) < n:
        raise ValueError(f"the filler made {len(ids)} tokens, fewer than {n}")
    return torch.tensor(ids)


def cpu_timed(fn):
    """(fn(), wall seconds, CPU seconds of this process). On a shared machine the CPU time is the steadier
    measure: with one thread it is the wall time an idle machine would take (on a GPU it misses the device time)."""
    start = time.process_time()
    out, seconds = common.timed(fn)
    return out, seconds, time.process_time() - start


def measure(tokens: int, specs: list[str] | None, device: str, floor_repeats: int, model_name: str = "demo",
            attn_implementation: str | None = None, overrides: dict | None = None) -> list[dict]:
    """The floor and one read per spec of `tokens` filler tokens, as rows; `overrides` are config fields of the
    model with memory (the floor's model has no memory layers)."""
    from knn_longllama.cli import load_model
    from knn_longllama.document import Document

    settings = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    overrides = dict(overrides or {})
    model, tokenizer = load_model(model_name, device, **settings, **overrides)
    bare, _ = load_model(model_name, device, mem_layers=[], **settings)
    if specs is None:
        specs = SPECS if model_name == "demo" else [str(model.config.memory_spec)]
    ids = filler_ids(tokenizer, tokens).to(device)
    labels = {"model": model_name, "attention": model.config._attn_implementation}
    set_labels = {**labels, "settings": common.overrides_text(overrides)}

    def floor():
        with torch.no_grad():
            bare.model(ids[None], use_cache=False, logits_to_keep=1)

    floors = [cpu_timed(floor)[1:] for _ in range(floor_repeats)]
    floor_s, floor_cpu = min(f[0] for f in floors), min(f[1] for f in floors)
    rows = [{**labels, "tokens": tokens, "memory_spec": "bare windows", "seconds": round(floor_s, 3), "x_floor": 1.0,
             "tokens_per_s": round(tokens / floor_s), "cpu_seconds": round(floor_cpu, 3), "x_floor_cpu": 1.0}]
    for spec in specs:
        common.reset_peak_rss()
        doc, seconds, cpu = cpu_timed(lambda: Document.read(model, ids, memory_spec=spec, progress=False))
        rows.append({**set_labels, "tokens": tokens, "memory_spec": spec, "seconds": round(seconds, 3),
                     "x_floor": round(seconds / floor_s, 2), "tokens_per_s": round(tokens / seconds),
                     "cpu_seconds": round(cpu, 3), "x_floor_cpu": round(cpu / floor_cpu, 2),
                     "peak_rss_mb": common.rss_mb(),
                     "memory_mb": round(sum(m.nbytes() for m in doc.memories.values()) / 2**20, 1)})
        del doc
    return rows


def main(argv=None) -> None:
    import knn_index

    args = parse_args(argv)
    knn_index.set_num_threads(args.threads)
    env, run = common.environment(args.device, args.threads), common.run_id(args.run)
    for tokens in args.tokens:
        rows = measure(tokens, args.memory, args.device, args.floor_repeats, args.model, args.attn_implementation,
                       dict(args.set))
        for row in rows:
            print(row, flush=True)
        common.append_rows("bench_read", rows, METRICS, run, env)


if __name__ == "__main__":
    main()
