"""Where the demo model's passkey failures come from: the key line against the window boundaries.

    python experiments/passkey_failures.py --lengths 1024 4096 --trials 20

For every trial of the standard passkey evaluation (same seeds as `knn_longllama.passkey.passkey_accuracy`) it finds
the two copies of the key in the prompt ("The pass key is K. Remember it. K is the pass key.") and asks whether each
copy, with the token before it, lies inside one window (`max_position_embeddings`) or in the final local context.
Non-memory layers only see their own window (spec section 3), so a copy cut by a window boundary loses the context
its keys are matched on. Writes experiments/results/passkey_failures.{csv,md}.
"""

import argparse
import csv
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from knn_longllama.demo import load_demo  # noqa: E402
from knn_longllama.passkey import answer_ids, make_passkey_prompt, n_garbage_for_tokens, passkey_trial  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")


def copy_is_whole(start: int, length: int, num_tokens: int, window: int, last_context: int) -> bool:
    """True if tokens start-1 .. start+length-1 (the key with the token before it) share one window, where windows
    are those of a forward pass: consecutive `window`-token windows, then the final `last_context` tokens."""
    first, last = start - 1, start + length - 1
    local = max(num_tokens - last_context, 0)
    if first >= local:
        return True
    if last >= local:
        return False
    return first // window == last // window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import knn_index

    knn_index.set_num_threads(args.threads)
    model, tokenizer = load_demo()
    window, last_context = model.config.max_position_embeddings, model.config.last_context_length
    rows = []
    for length in args.lengths:
        n_garbage = n_garbage_for_tokens(tokenizer, length)
        rng = random.Random(f"passkey-0-{n_garbage}")  # the trials of passkey_accuracy(seed=0)
        for trial in range(args.trials):
            prompt, key = make_passkey_prompt(n_garbage, rng)
            ids = tokenizer(prompt).input_ids
            digits = answer_ids(tokenizer, key)[1:]  # without the leading space piece
            starts = [i for i in range(len(ids)) if ids[i : i + len(digits)] == digits]
            whole = sum(copy_is_whole(s, len(digits), len(ids), window, last_context) for s in starts)
            result = passkey_trial(model, tokenizer, prompt, key)
            rows.append({"tokens": length, "trial": trial, "key": key, "correct": int(result["correct"]),
                         "generated": result["generated_text"], "copies": len(starts), "whole_copies": whole,
                         "positions_in_window": " ".join(str(s % window) for s in starts)})
    with open(os.path.join(RESULTS, "passkey_failures.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["**Passkey accuracy of the demo model by whether both copies of the key lie inside one window** "
             f"(window {window}, dense memory, {args.trials} trials per length)", "",
             "| tokens | both copies whole | correct | a copy cut by a boundary | correct |", "|---|---|---|---|---|"]
    for length in args.lengths:
        sub = [r for r in rows if r["tokens"] == length]
        whole = [r for r in sub if r["whole_copies"] == r["copies"]]
        cut = [r for r in sub if r["whole_copies"] < r["copies"]]
        lines.append(f"| {length} | {len(whole)} | {sum(r['correct'] for r in whole)} | {len(cut)} | "
                     f"{sum(r['correct'] for r in cut)} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "passkey_failures.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
