"""Does block retrieval find the pass key? Per passkey trial, the share of lookups that retrieve the key's block.

    python -m experiments.block_retrieval --lengths 32768 --trials 4
    python -m experiments.block_retrieval --lengths 32768 --trials 1 --first-trial 2 --settings "mem_attention_grouping=9x64"

A trial runs `passkey_trial` as `experiments.training_free` does (`--model smollm2` with the former training-free
rule's blocks, distance 1024 and 64 sinks, by default) and
records every lookup of a block memory (`BlockMemory.token_ids`): which tokens it offered. A lookup made once the
whole prompt prefix is in memory (the prompt's final window, then every generated token) "hits" when it offers
every token of the key line ("The pass key is K."). Rows of experiments/results/results.csv (experiment
`block_retrieval`): whether the trial answered, the key line's place in memory, and the hit shares of the final
window's lookups and of the generation steps' lookups over (layer, KV head), with the layers where the final window
missed. A trial that fails with hits everywhere failed at reading what it retrieved; one with misses failed at
retrieval.
"""

from __future__ import annotations

import argparse
import time

import knn_index

from experiments import common
from experiments.training_free import parse_settings
from knn_longllama.cli import load_model
from knn_longllama.memory import BlockMemory
from knn_longllama.passkey import n_garbage_for_tokens, passkey_prompts, passkey_trial

EXPERIMENT = "block_retrieval"
METRICS = ["correct", "key_token", "memory_tokens", "final_hits", "decode_hits", "missed_layers", "seconds"]


def key_span(tokenizer, prompt: str, key: int, sinks: int) -> tuple[int, int]:
    """Memory positions [start, stop) of the key line's first sentence in the searched memory (after the sinks)."""
    line = f"The pass key is {key}."
    at = prompt.index(line)
    start = len(tokenizer(prompt[:at])["input_ids"])
    stop = len(tokenizer(prompt[:at + len(line)])["input_ids"])
    return start - sinks, stop - sinks


class Recorder:
    """Wraps `BlockMemory.token_ids` to log (memory, its size, queries, offered ids of row 0 per head) of every
    lookup."""

    def __init__(self):
        self.calls, self.original = [], BlockMemory.token_ids

    def __enter__(self):
        recorder = self

        def token_ids(memory, queries, h0, h1):
            ids = recorder.original(memory, queries, h0, h1)
            if ids is not None:
                recorder.calls.append((id(memory), len(memory), queries.shape[2], ids[0]))
            return ids

        BlockMemory.token_ids = token_ids
        return self

    def __exit__(self, *exc):
        BlockMemory.token_ids = self.original


def run(model_name: str, settings: str, memory: str, lengths: list[int], trials: int, first_trial: int, seed: int,
        threads: int, label: str | None, results=None) -> list[dict]:
    knn_index.set_num_threads(threads)
    run_name, env = common.run_id(label), common.environment("cpu", threads, results=results)
    model, tokenizer = load_model(model_name, "cpu", **parse_settings(settings))
    rows = []
    for length in lengths:
        n_garbage = n_garbage_for_tokens(tokenizer, length)
        for trial, (prompt, key) in enumerate(passkey_prompts(n_garbage, first_trial + trials, seed)):
            if trial < first_trial:
                continue
            start, stop = key_span(tokenizer, prompt, key, model.config.mem_sink_tokens)
            started = time.perf_counter()
            with Recorder() as recorder:
                result = passkey_trial(model, tokenizer, prompt, key, memory_spec=memory)
            full = max(size for _, size, _, _ in recorder.calls)
            layers = {}  # id(memory) -> layer: memories are first looked up in layer order
            for mem, _, _, _ in recorder.calls:
                layers.setdefault(mem, len(layers))
            groups = model.config.num_attention_heads // model.config.num_key_value_heads
            final, decode, missed = [], [], set()
            for mem, size, queries, ids in recorder.calls:
                if size < full:  # a prefix window's lookup
                    continue
                hits = [bool(((row >= start) & (row < stop)).sum() == stop - start) for row in ids]
                (decode if queries == groups else final).extend(hits)  # one token's queries: a generation step
                if queries > groups and not all(hits):
                    missed.add(layers[mem])
            row = dict(model=model_name, settings=settings or "default", memory_spec=memory, tokens=length,
                       seed=seed, trial=trial, correct=int(result["correct"]), key_token=start,
                       memory_tokens=full, final_hits=round(sum(final) / max(len(final), 1), 3),
                       decode_hits=round(sum(decode) / max(len(decode), 1), 3),
                       missed_layers=" ".join(map(str, sorted(missed))) or "-",
                       seconds=round(time.perf_counter() - started, 1))
            rows.append(row)
            common.append_rows(EXPERIMENT, [row], METRICS, run_name, env, results=results)
            print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.block_retrieval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--settings", default="mem_distance=1024,mem_sink_tokens=64",
                        help="config overrides, as in experiments.training_free (default: the distance and sinks of "
                             "the former training-free rule, whose blocks this diagnoses)")
    parser.add_argument("--memory", default="exact k=16 block=128")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--first-trial", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run", default=None, help="the run's label (default: its start time)")
    args = parser.parse_args(argv)
    run(args.model, args.settings, args.memory, args.lengths, args.trials, args.first_trial, args.seed,
        args.threads, args.run)


if __name__ == "__main__":
    main()
