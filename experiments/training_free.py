"""Training-free reading with a pretrained checkpoint: passkey accuracy per model setting, memory and length.

    python -m experiments.training_free --lengths 16384 32768 --trials 2 \
        --settings "" "mem_distance=1024" "mem_distance=1024,mem_sink_tokens=64" --memory "exact k=32"

Each `--settings` item is a comma-separated list of config overrides (`name=int`, `mem_layers=a-b` for a range
of layers, `mem_attention_grouping=HxQ` for a pair) applied on top of the model's defaults (`--model smollm2`: cli.SMOLLM2);
"" (no overrides) is recorded as the distance and sinks the defaults gave. Every trial is one row of
experiments/results/results.csv (experiment "training_free"): whether the pass key was found, the prompt length,
the seconds it took and the text generated, so that failures can be read.
"""

from __future__ import annotations

import argparse
import time

import knn_index

try:
    from experiments import common
except ModuleNotFoundError:  # run as a script
    import common

from knn_longllama.cli import load_model
from knn_longllama.passkey import n_garbage_for_tokens, passkey_prompts, passkey_trial

EXPERIMENT = "training_free"


def parse_settings(text: str) -> dict:
    """"mem_distance=1024,mem_sink_tokens=64,mem_layers=15-29" -> config overrides ("" -> {})."""
    settings = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--settings {text!r}: expected name=value items, got {item!r}")
        if name == "mem_layers" and "-" in value:
            first, last = (int(v) for v in value.split("-"))
            settings[name] = list(range(first, last + 1))
        elif "x" in value:  # mem_attention_grouping=9x64: (heads, queries)
            settings[name] = tuple(int(v) for v in value.split("x"))
        elif value in ("none", "null"):
            settings[name] = None
        else:
            settings[name] = int(value)
    return settings


def defaults_label(config) -> str:
    """The settings a row measured without overrides, named by the values the model's defaults gave them (the
    training-free rule has changed; "default" alone would not say which)."""
    distance = "none" if config.mem_distance is None else config.mem_distance
    return f"mem_distance={distance},mem_sink_tokens={config.mem_sink_tokens}"


def run(model_name: str, settings_list: list[str], memories: list[str], lengths: list[int], trials: int, seed: int,
        threads: int, label: str | None, results=None, verbose: bool = True, first_trial: int = 0) -> list[dict]:
    knn_index.set_num_threads(threads)
    run_name = common.run_id(label)
    env = common.environment("cpu", threads, results=results)
    rows = []
    for text in settings_list:
        overrides = parse_settings(text)
        model, tokenizer = load_model(model_name, "cpu", **overrides)
        for memory in memories:
            for length in lengths:
                n_garbage = n_garbage_for_tokens(tokenizer, length)
                for trial, (prompt, key) in enumerate(passkey_prompts(n_garbage, first_trial + trials, seed)):
                    if trial < first_trial:  # the prompts of earlier trials, measured by an earlier run
                        continue
                    started = time.perf_counter()
                    result = passkey_trial(model, tokenizer, prompt, key, memory_spec=memory)
                    row = dict(model=model_name, settings=text or defaults_label(model.config), memory_spec=memory,
                               tokens=length,
                               seed=seed, trial=trial, correct=int(result["correct"]),
                               prompt_tokens=result["prompt_tokens"],
                               seconds=round(time.perf_counter() - started, 2),
                               generated=result["generated_text"].strip().replace("\n", " ")[:40] or "-")
                    rows.append(row)
                    common.append_rows(EXPERIMENT, [row], ["correct", "prompt_tokens", "seconds", "generated"],
                                       run_name, env, results=results)
                    if verbose:
                        print(f"{row['settings']:>40} {memory:>28} {length:>7} trial {trial}: "
                              f"{'ok ' if row['correct'] else 'no '} {row['seconds']:>7.1f}s  {row['generated']!r}",
                              flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.training_free", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--settings", nargs="+", default=[""], help="config overrides per setting (see above)")
    parser.add_argument("--memory", nargs="+", default=["exact k=32"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-trial", type=int, default=0, help="skip the first trials (measured before)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run", default=None, help="the run's label (default: its start time)")
    args = parser.parse_args(argv)
    run(args.model, args.settings, args.memory, args.lengths, args.trials, args.seed, args.threads, args.run,
        first_trial=args.first_trial)


if __name__ == "__main__":
    main()
