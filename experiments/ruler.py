"""RULER-style scores of a real model per context length (knn_longllama/ruler.py): the in-context baseline and
the memory modes, one row per sample in experiments/results/results.csv.

    python -m experiments.ruler --model smollm2 --in-context --lengths 2048 4096 8192 --samples 10 --run baseline
    python -m experiments.ruler --model smollm2 --memory "exact k=32" --lengths 8192 --samples 3 --run mem_8k
    python -m experiments.ruler --model smollm2 --memory "exact k=32" --lengths 32768 --tasks niah_single_1 vt \\
        --set last_context_length=256 max_position_embeddings=512 --label "window 512" --first-sample 3 --samples 2

`--in-context` reads the whole prompt with transformers' own LlamaForCausalLM (no windows, no memory); otherwise the
model is loaded as `knn-longllama --model` does (`--model smollm2`: memory in every layer, its windows), with
`--mem-layers` and any config field overridden by `--set FIELD=VALUE` (VALUE parsed as JSON, else kept as text).
Sample i of (task, length, seed) is the same prompt in every run, so a point can grow in later runs
(`--first-sample`); the results page pools each (setting, task, length) over its samples, a sample measured again
counting once (its last run). Every sample is appended as soon as it is scored (experiment `ruler_sample`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from experiments import common

METRICS = ["score", "prompt_tokens", "generated_tokens", "seconds", "prediction"]


def setting_label(args, overrides: dict) -> str:
    """What the rows measured, in words: "in context", or "memory <spec>" and the overrides (or --label)."""
    if args.label:
        return args.label
    if args.in_context:
        return "in context"
    extra = common.overrides_text(overrides)
    return f"memory {args.memory or 'default'}" + (f" {extra}" if extra else "")


def load(args, overrides: dict):
    from knn_longllama.cli import load_in_context, load_model

    if args.in_context:
        return load_in_context(args.model, args.device)
    return load_model(args.model, args.device, **overrides)


def parse_args(argv=None):
    from knn_longllama.cli import layer_index, memory_spec, non_negative_int, positive_int, thread_count
    from knn_longllama.ruler import TASKS

    parser = argparse.ArgumentParser(prog="python -m experiments.ruler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (default), 'demo', a .gguf file or a folder")
    parser.add_argument("--in-context", action="store_true",
                        help="the baseline: transformers' LlamaForCausalLM on the whole prompt (no windows, no memory)")
    parser.add_argument("--memory", type=memory_spec, default=None, help="memory spec (default: the model's own)")
    parser.add_argument("--mem-layers", type=layer_index, nargs="*", default=None,
                        help="memory layers: indices, 'all', or no value for none")
    parser.add_argument("--set", type=common.config_override, nargs="+", default=[], metavar="FIELD=VALUE",
                        help="config overrides, e.g. last_context_length=256 (values parsed as JSON)")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), metavar="TASK",
                        help=f"default: all ({', '.join(TASKS)})")
    parser.add_argument("--samples", type=positive_int, default=5)
    parser.add_argument("--first-sample", type=non_negative_int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--label", default=None, help="the setting's name in the tables (default: from the options)")
    parser.add_argument("--run", default=None, help="the run's label (default: its start time)")
    parser.add_argument("--threads", type=thread_count, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.in_context and (args.memory or args.mem_layers is not None or args.set):
        parser.error("--in-context reads without memory or windows: drop --memory, --mem-layers and --set")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import knn_index

    from knn_longllama.ruler import ruler_scores, score_table

    knn_index.set_num_threads(args.threads)
    overrides = dict(args.set)
    if args.mem_layers is not None:
        overrides["mem_layers"] = "all" if args.mem_layers == ["all"] else [int(i) for i in args.mem_layers]
    model, tokenizer = load(args, overrides)
    run, env = common.run_id(args.run), common.environment(args.device, args.threads)
    label = setting_label(args, overrides)
    config = model.config
    point = dict(model=args.model if args.model in ("smollm2", "demo") else os.path.basename(args.model.rstrip("/")),
                 setting=label, memory_spec="-" if args.in_context else args.memory or config.memory_spec,
                 window="-" if args.in_context else config.max_position_embeddings,
                 local="-" if args.in_context else config.last_context_length,
                 mem_layers="-" if args.in_context else len(config.mem_layers), chat=args.chat)
    command = shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"run {run!r}, environment {env}, setting {label!r}: python -m experiments.ruler {command}", flush=True)

    def record(result):
        row = dict(point, task=result["task"], tokens=result["target_tokens"], seed=result["seed"],
                   sample=result["index"], depth=json.dumps(result["depths"]), score=round(result["score"], 4),
                   prompt_tokens=result["prompt_tokens"], generated_tokens=result["generated_tokens"],
                   seconds=round(result["seconds"], 2), prediction=result["prediction"][:200].replace("\n", " "))
        common.append_rows("ruler_sample", [row], METRICS, run, env)

    kwargs = {} if args.in_context or args.memory is None else {"memory_spec": args.memory}
    rows = ruler_scores(model, tokenizer, args.lengths, args.tasks, samples=args.samples, seed=args.seed,
                        start=args.first_sample, chat={"auto": "auto", "yes": True, "no": False}[args.chat],
                        on_sample=record, **kwargs)
    print(score_table(rows), flush=True)


if __name__ == "__main__":
    main()
