"""Where the demo model's passkey failures come from: the key line against the window boundaries.

    python -m experiments.passkey_failures --lengths 1024 4096 --trials 20

For every trial of the standard passkey evaluation (same seeds as `knn_longllama.passkey.passkey_accuracy`) it finds
the two copies of the key in the prompt ("The pass key is K. Remember it. K is the pass key.") and asks whether each
copy, with the token before it, and the whole key line lie inside one window (`max_position_embeddings`) or in the
final local context. Non-memory layers only see their own window (docs/semantics.md, "Windows"), so a copy cut by a
window boundary loses the context its keys are matched on. Rows go to experiments/results/results.csv
(`passkey_failure`).

`--key-line first` (or `second`) runs the same trials with a key line that states the key once ("The pass key is K.
Remember it." / "Remember it. K is the pass key."): a model that retrieves the digits after "The pass key is" from
memory answers these; one that only spots a key repeated inside one window does not.

`--recorded SCALE` runs no model: for every passkey trial the scaling experiments recorded at that scale
(`passkey_trial` rows), it rebuilds the trial's prompt, checks its key against the record and reports where the key
line sat in its window, beside whether the run answered (`passkey_failure_recorded`).
"""

import argparse

from experiments import common
from knn_longllama.passkey import INFO_TEMPLATE, answer_ids, n_garbage_for_tokens, passkey_prompts, passkey_trial

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


def recorded_rows(tokenizer, scale: str, window: int, last_context: int) -> list[dict]:
    """One row per recorded passkey trial of `scale`: where its key line sat in its window (no model run)."""
    trials = common.table("passkey_trial")
    trials = trials[trials["scale"] == scale] if not trials.empty else trials
    if trials.empty:
        raise ValueError(f"--recorded {scale!r}: no passkey trials recorded at that scale")
    trials = trials.drop_duplicates(["index", "k", "tokens", "seed", "trial"], keep="last")
    prompts = {}  # (tokens, seed) -> the prompts of that seed up to the largest recorded trial
    for (tokens, seed), part in trials.groupby(["tokens", "seed"]):
        prompts[(tokens, seed)] = list(passkey_prompts(n_garbage_for_tokens(tokenizer, tokens), part["trial"].max() + 1,
                                                       seed))
    rows = []
    for _, r in trials.iterrows():
        prompt, key = prompts[(r["tokens"], r["seed"])][r["trial"]]
        if key != r["key"]:
            raise ValueError(f"{r['index']} seed {r['seed']} trial {r['trial']}: the record's key {r['key']} is not "
                             f"the prompt's {key} (recorded with another tokenizer?)")
        ids, t0, t1 = key_line_tokens(tokenizer, prompt, INFO_TEMPLATE.format(key=key))
        local = t0 >= max(len(ids) - last_context, 0)
        rows.append({"recorded": scale, "window": window, "index": r["index"], "k": r["k"], "tokens": r["tokens"],
                     "seed": r["seed"], "trial": r["trial"], "key": key, "depth": r["depth"],
                     "correct": int(r["correct"]), "line_start": t0,
                     "window_position": "local" if local else t0 % window,
                     "line_whole": int(span_in_one_window(t0, t1, len(ids), window, last_context))})
    return rows


def trial_row(model, tokenizer, prompt: str, key: int, key_line: str, window: int, last_context: int) -> dict:
    """One trial: whether it was answered, and where the key's copies and the key line fall against the windows."""
    ids, t0, t1 = key_line_tokens(tokenizer, prompt, KEY_LINES[key_line].format(key=key))
    digits = answer_ids(tokenizer, key)[1:]  # without the leading space piece
    starts = [i for i in range(len(ids)) if ids[i : i + len(digits)] == digits]
    result = passkey_trial(model, tokenizer, prompt, key)
    return {"key": key, "correct": int(result["correct"]), "generated": result["generated_text"],
            "copies": len(starts),
            "whole_copies": sum(copy_is_whole(s, len(digits), len(ids), window, last_context) for s in starts),
            "line_whole": int(span_in_one_window(t0, t1, len(ids), window, last_context)),
            "copies_together": int(span_in_one_window(starts[0], starts[-1] + len(digits) - 1, len(ids), window,
                                                      last_context)),
            "positions_in_window": " ".join(str(s % window) for s in starts)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.passkey_failures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: the shipped demo model)")
    parser.add_argument("--key-line", choices=sorted(KEY_LINES), default="official",
                        help="official: the key twice (docs/semantics.md, 'Passkey evaluation'); first / second: only "
                             "that copy")
    parser.add_argument("--recorded", default=None, metavar="SCALE",
                        help="run no model: where the key line sat in the passkey trials recorded at SCALE")
    parser.add_argument("--run", "--tag", dest="run", default=None, help="the run's label (default: its start time)")
    args = parser.parse_args(argv)
    import knn_index

    knn_index.set_num_threads(args.threads)
    if args.model:
        from transformers import AutoTokenizer

        from knn_longllama import LongLlamaForCausalLM

        model = LongLlamaForCausalLM.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        from knn_longllama.demo import load_demo

        model, tokenizer = load_demo()
    window, last_context = model.config.max_position_embeddings, model.config.last_context_length
    run, env = common.run_id(args.run), common.environment("cpu", args.threads)
    if args.recorded:
        common.append_rows("passkey_failure_recorded", recorded_rows(tokenizer, args.recorded, window, last_context),
                           ["key", "depth", "correct", "line_start", "window_position", "line_whole"], run, env)
        return
    for length in args.lengths:
        n_garbage = n_garbage_for_tokens(tokenizer, length)
        # the trials of passkey_accuracy(seed=0), with the chosen key line
        prompts = passkey_prompts(n_garbage, args.trials, seed=0, info_template=KEY_LINES[args.key_line])
        rows = [dict(key_line=args.key_line, window=window, tokens=length, trial=trial,
                     **trial_row(model, tokenizer, prompt, key, args.key_line, window, last_context))
                for trial, (prompt, key) in enumerate(prompts)]
        common.append_rows("passkey_failure", rows, ["key", "correct", "generated", "copies", "whole_copies",
                                                     "line_whole", "copies_together", "positions_in_window"], run, env)
        print(f"{length} tokens: {sum(r['correct'] for r in rows)} of {len(rows)} correct", flush=True)


if __name__ == "__main__":
    main()
