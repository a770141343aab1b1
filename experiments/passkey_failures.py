"""Where the demo model's passkey failures come from: the key line against the window boundaries.

    python experiments/passkey_failures.py --lengths 1024 4096 --trials 20

For every trial of the standard passkey evaluation (same seeds as `knn_longllama.passkey.passkey_accuracy`) it finds
the two copies of the key in the prompt ("The pass key is K. Remember it. K is the pass key.") and asks whether each
copy, with the token before it, and the whole key line lie inside one window (`max_position_embeddings`) or in the
final local context.
Non-memory layers only see their own window (docs/semantics.md, "Windows"), so a copy cut by a window boundary loses the context
its keys are matched on. Writes experiments/results/passkey_failures.{csv,md}.

`--key-line first` (or `second`) runs the same trials with a key line that states the key once ("The pass key is K.
Remember it." / "Remember it. K is the pass key."): a model that retrieves the digits after "The pass key is" from
memory answers these; one that only spots a key repeated inside one window does not. Written as
passkey_failures_<key-line>.{csv,md}. `--tag` adds a suffix (e.g. for many trials at one length).

`--recorded NAME` runs no model: for every trial recorded by the scaling experiments in
experiments/results/passkey_trials_NAME*.csv (e.g. `full_1m`, the 1M-token trials), it rebuilds the trial's prompt,
checks its key against the record and reports where the key line sat in its window, beside whether the run answered.
Written as passkey_failures_recorded_NAME.{csv,md}.
"""

import argparse
import csv
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from knn_longllama.demo import load_demo  # noqa: E402
from knn_longllama.passkey import (  # noqa: E402
    INFO_TEMPLATE, answer_ids, n_garbage_for_tokens, passkey_prompts, passkey_trial,
)

RESULTS = os.path.join(ROOT, "experiments", "results")
KEY_LINES = {"official": INFO_TEMPLATE, "first": "The pass key is {key}. Remember it.",
             "second": "Remember it. {key} is the pass key."}


def copy_is_whole(start: int, length: int, num_tokens: int, window: int, last_context: int) -> bool:
    """True if tokens start-1 .. start+length-1 (the key with the token before it) share one window, where windows
    are those of a forward pass: consecutive `window`-token windows, then the final `last_context` tokens."""
    return span_in_one_window(start - 1, start + length - 1, num_tokens, window, last_context)


def span_in_one_window(first: int, last: int, num_tokens: int, window: int, last_context: int) -> bool:
    """True if tokens first .. last share one window of a forward pass (as in `copy_is_whole`)."""
    local = max(num_tokens - last_context, 0)
    if first >= local:
        return True
    if last >= local:
        return False
    return first // window == last // window


def key_line_tokens(tokenizer, prompt: str, line: str) -> tuple[list[int], int, int]:
    """The prompt's token ids and the first and last token of `line` (the key line) in them."""
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    c0 = prompt.index(line)
    c1 = c0 + len(line)
    t0 = next(i for i, (a, b) in enumerate(encoded.offset_mapping) if b > c0)
    t1 = max(i for i, (a, b) in enumerate(encoded.offset_mapping) if a < c1 and b > a)
    return encoded.input_ids, t0, t1


def window_position(token: int, num_tokens: int, window: int, last_context: int) -> int | None:
    """Where `token` sits in its window of a forward pass (as in `span_in_one_window`); None in the final local
    context."""
    return None if token >= max(num_tokens - last_context, 0) else token % window


def recorded_rows(tokenizer, name: str, window: int, last_context: int) -> list[dict]:
    """One row per trial of passkey_trials_<name>*.csv: where its key line sat in its window (no model run)."""
    records = []
    for path in sorted(glob.glob(os.path.join(RESULTS, f"passkey_trials_{name}*.csv"))):
        with open(path) as f:
            records += list(csv.DictReader(f))
    if not records:
        raise ValueError(f"--recorded {name!r}: no experiments/results/passkey_trials_{name}*.csv")
    prompts = {}  # (tokens, seed) -> the prompts of that seed up to the largest recorded trial
    for r in records:
        key = (int(r["tokens"]), int(r["seed"]))
        prompts[key] = max(prompts.get(key, 0), int(r["trial"]) + 1)
    for (tokens, seed), trials in prompts.items():
        prompts[(tokens, seed)] = list(passkey_prompts(n_garbage_for_tokens(tokenizer, tokens), trials, seed))
    rows = []
    for r in records:
        prompt, key = prompts[(int(r["tokens"]), int(r["seed"]))][int(r["trial"])]
        if key != int(r["key"]):
            raise ValueError(f"{r['index']} seed {r['seed']} trial {r['trial']}: the record's key {r['key']} is not "
                             f"the prompt's {key} (recorded with another tokenizer?)")
        ids, t0, t1 = key_line_tokens(tokenizer, prompt, INFO_TEMPLATE.format(key=key))
        position = window_position(t0, len(ids), window, last_context)
        rows.append({"index": r["index"], "k": r["k"], "tokens": r["tokens"], "seed": r["seed"], "trial": r["trial"],
                     "key": key, "depth": r["depth"], "correct": int(r["correct"]), "line_start": t0,
                     "window_position": "local" if position is None else position,
                     "line_whole": int(span_in_one_window(t0, t1, len(ids), window, last_context))})
    return rows


def recorded_table(rows: list[dict], name: str, window: int) -> str:
    """Correct / trials per (index, k, length) by the quarter of its window where the key line starts."""
    quarter = window // 4
    edges = [f"{q * quarter}-{(q + 1) * quarter - 1}" for q in range(4)]
    lines = [f"**Where the key line sat in its window, recorded passkey trials** (`passkey_failures.py --recorded "
             f"{name}`: the trials of passkey_trials_{name}*.csv, no model run; window {window}; correct / trials by "
             "the position in its window of the key line's first token; local: in the final local context)", "",
             "| index | k | tokens | " + " | ".join(edges) + " | local | key line cut |",
             "|---|---|---|" + "---|" * 6]
    points = sorted({(r["index"], r["k"], int(r["tokens"])) for r in rows},
                    key=lambda p: (p[2], p[0], int(p[1]) if p[1].isdigit() else -1))  # k in numeric order
    for index, k, n in points:
        sub = [r for r in rows if (r["index"], r["k"], int(r["tokens"])) == (index, k, n)]
        groups = [[r for r in sub if r["window_position"] != "local" and r["window_position"] // quarter == q]
                  for q in range(4)]
        groups += [[r for r in sub if r["window_position"] == "local"], [r for r in sub if not r["line_whole"]]]
        cells = " | ".join(f"{sum(r['correct'] for r in g)}/{len(g)}" if g else "-" for g in groups)
        lines.append(f"| {index} | {k} | {n} | {cells} |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], stem: str, text: str) -> None:
    with open(os.path.join(RESULTS, f"{stem}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(RESULTS, f"{stem}.md"), "w") as f:
        f.write(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: the shipped demo model)")
    parser.add_argument("--key-line", choices=sorted(KEY_LINES), default="official",
                        help="official: the key twice (docs/semantics.md, 'Passkey evaluation'); first / second: only that copy")
    parser.add_argument("--recorded", default=None, metavar="NAME",
                        help="run no model: where the key line sat in the trials of passkey_trials_NAME*.csv")
    parser.add_argument("--tag", default=None, help="results are written as passkey_failures[_<key-line>]_<tag>.*")
    args = parser.parse_args()
    import knn_index

    knn_index.set_num_threads(args.threads)
    if args.model:
        from transformers import AutoTokenizer

        from knn_longllama import LongLlamaForCausalLM

        model = LongLlamaForCausalLM.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = load_demo()
    window, last_context = model.config.max_position_embeddings, model.config.last_context_length
    if args.recorded:
        rows = recorded_rows(tokenizer, args.recorded, window, last_context)
        write(rows, f"passkey_failures_recorded_{args.recorded}", recorded_table(rows, args.recorded, window))
        return
    rows = []
    for length in args.lengths:
        n_garbage = n_garbage_for_tokens(tokenizer, length)
        # the trials of passkey_accuracy(seed=0), with the chosen key line
        for trial, (prompt, key) in enumerate(passkey_prompts(n_garbage, args.trials, seed=0,
                                                              info_template=KEY_LINES[args.key_line])):
            # the whole key line, "The pass key is K. Remember it. K is the pass key.", in tokens
            ids, t0, t1 = key_line_tokens(tokenizer, prompt, KEY_LINES[args.key_line].format(key=key))
            digits = answer_ids(tokenizer, key)[1:]  # without the leading space piece
            starts = [i for i in range(len(ids)) if ids[i : i + len(digits)] == digits]
            whole = sum(copy_is_whole(s, len(digits), len(ids), window, last_context) for s in starts)
            together = span_in_one_window(starts[0], starts[-1] + len(digits) - 1, len(ids), window, last_context)
            line_whole = span_in_one_window(t0, t1, len(ids), window, last_context)
            result = passkey_trial(model, tokenizer, prompt, key)
            rows.append({"tokens": length, "trial": trial, "key": key, "correct": int(result["correct"]),
                         "generated": result["generated_text"], "copies": len(starts), "whole_copies": whole,
                         "line_whole": int(line_whole), "copies_together": int(together),
                         "positions_in_window": " ".join(str(s % window) for s in starts)})
    stem = "passkey_failures" + ("" if args.key_line == "official" else f"_{args.key_line}")
    stem += f"_{args.tag}" if args.tag else ""
    lines = ["**Passkey accuracy of the demo model by where window boundaries fall** "
             f"(window {window}, dense memory, {args.trials} trials per length, key line: "
             f"\"{KEY_LINES[args.key_line].format(key='K')}\"; a copy of the key is whole when it and the token "
             "before it share a window; copies in one window: all digits of both copies share a window)", "",
             "| tokens | key line in one window | correct | key line cut | correct | copies in one window | correct | "
             "copies apart | correct | each copy whole | correct | a copy cut | correct |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for length in args.lengths:
        sub = [r for r in rows if r["tokens"] == length]
        groups = [[r for r in sub if r["line_whole"]], [r for r in sub if not r["line_whole"]],
                  [r for r in sub if r["copies_together"]], [r for r in sub if not r["copies_together"]],
                  [r for r in sub if r["whole_copies"] == r["copies"]], [r for r in sub if r["whole_copies"] < r["copies"]]]
        lines.append(f"| {length} | " + " | ".join(f"{len(g)} | {sum(r['correct'] for r in g)}" for g in groups) + " |")
    write(rows, stem, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
