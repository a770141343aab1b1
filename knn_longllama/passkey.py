"""Passkey retrieval, the headline LongLLaMA evaluation (docs/semantics.md, "Passkey evaluation"), for any model and tokenizer.

The prompt is five parts joined by newlines: the task description, a filler prefix, the line with the pass key, a
filler suffix and the question. The filler sentence is repeated (joined by spaces) and cut *by characters*; the prefix
length is uniform in [0, n_garbage] and the suffix takes the rest; the key is uniform in [1, 50000). The model
greedily generates as many tokens as the answer has, and a trial is correct iff the generated ids equal the answer's
ids (the key tokenized on its own, without special tokens).

    knn-longllama passkey --lengths 512 2048 8192 --trials 20                      # the demo model
    knn-longllama passkey --model path/to/checkpoint --lengths 16384 --memory dense "IVF1024,Flat k=32 nprobe=32"
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import torch

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INFO_TEMPLATE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_LOW, KEY_HIGH = 1, 50000  # the key is uniform in [KEY_LOW, KEY_HIGH)


def repeated_filler(n_chars: int, filler: str = FILLER) -> str:
    """The filler sentence repeated (joined by single spaces) and cut to exactly `n_chars` characters."""
    if n_chars <= 0:
        return ""
    copies = n_chars // (len(filler) + 1) + 1
    return " ".join([filler] * copies)[:n_chars]


def make_passkey_prompt(n_garbage: int, rng: random.Random, *, filler: str = FILLER, key: int | None = None,
                        depth: float | None = None, task: str = TASK_DESCRIPTION, info_template: str = INFO_TEMPLATE,
                        question: str = QUESTION) -> tuple[str, int]:
    """One passkey prompt with `n_garbage` filler characters around the key line; returns (prompt, key).

    Draws, in this order, the prefix length (uniform in [0, n_garbage]) and the key (uniform in [1, 50000)) from
    `rng`, unless `depth` (the share of the filler before the key line: 0 puts it first, 1 last) or `key` is given.
    The keyword arguments allow other fillers and wordings (for training data)."""
    if depth is not None and not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    n_prefix = rng.randint(0, n_garbage) if depth is None else round(depth * n_garbage)
    if key is None:
        key = rng.randrange(KEY_LOW, KEY_HIGH)
    parts = [
        task,
        repeated_filler(n_prefix, filler),
        info_template.format(key=key),
        repeated_filler(n_garbage - n_prefix, filler),
        question,
    ]
    return "\n".join(parts), key


def passkey_prompts(n_garbage: int, trials: int, seed: int = 0, **prompt_kwargs) -> Iterator[tuple[str, int]]:
    """The evaluation's `trials` seeded prompts with `n_garbage` filler characters, as (prompt, key) pairs.

    Trial i of a (seed, n_garbage) pair is the same prompt for every model, tokenizer and caller (the passkey
    accuracy, the recall experiment's passkey text, the failure analysis) and for any number of trials.
    `prompt_kwargs` go to `make_passkey_prompt` (e.g. another `info_template`, or a fixed `depth`)."""
    rng = random.Random(f"passkey-{seed}-{n_garbage}")
    for _ in range(trials):
        yield make_passkey_prompt(n_garbage, rng, **prompt_kwargs)


def answer_ids(tokenizer, key: int) -> list[int]:
    """The ids the model must generate: those that follow the question when the prompt goes on with " <key>".

    For SentencePiece tokenizers (LLaMA's, the demo's) that is the key tokenized on its own, the official scoring
    (identical for every key of the demo tokenizer, tested); a byte-level BPE tokenizer (GPT-2 style, SmolLM2's)
    puts the space in a token of its own, which the model must write too. Where the question's own tokens change
    when the key follows, the key on its own."""
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    full = tokenizer(f"{QUESTION} {key}", add_special_tokens=False).input_ids
    if full[: len(question)] != question:
        return list(tokenizer(str(key), add_special_tokens=False).input_ids)
    return list(full[len(question):])


def chars_per_token(tokenizer, filler: str = FILLER, n_chars: int = 20000) -> float:
    """Characters per token of the repeated filler under `tokenizer`."""
    text = repeated_filler(n_chars, filler)
    return len(text) / len(tokenizer(text, add_special_tokens=False).input_ids)


def fixed_prompt_tokens(tokenizer) -> int:
    """Tokens of a prompt without filler (with a typical 5-digit key): the shortest passkey prompt."""
    fixed, _ = make_passkey_prompt(0, random.Random(0), key=12345)
    return len(tokenizer(fixed).input_ids)


def n_garbage_for_tokens(tokenizer, target_tokens: int, filler: str = FILLER) -> int:
    """Filler characters that make a prompt of about `target_tokens` tokens: the tokens left after the fixed parts
    (`fixed_prompt_tokens`) times the filler's characters per token."""
    return max(0, int((target_tokens - fixed_prompt_tokens(tokenizer)) * chars_per_token(tokenizer, filler)))


@torch.no_grad()
def passkey_trial(model, tokenizer, prompt: str, key: int, **generate_kwargs) -> dict:
    """Greedy-generate as many tokens as the answer has; correct iff the generated ids equal the answer's ids."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids = encoded.input_ids.to(device)
    target = answer_ids(tokenizer, key)
    kwargs = dict(max_new_tokens=len(target), do_sample=False, num_beams=1)
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    kwargs.update(generate_kwargs)
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    generated = output[0, input_ids.shape[1]:].tolist()
    return dict(correct=generated == target, key=key, generated=generated, answer=target,
                prompt_tokens=input_ids.shape[1], generated_text=tokenizer.decode(generated))


def passkey_accuracy(model, tokenizer, target_tokens: int, trials: int = 20, seed: int = 0,
                     n_garbage: int | None = None, **generate_kwargs) -> dict:
    """Accuracy over `trials` seeded passkey prompts of about `target_tokens` tokens (or exactly `n_garbage` filler
    characters). The trials of one (seed, length) pair are the same for every model and tokenizer."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    if n_garbage is None:
        n_garbage = n_garbage_for_tokens(tokenizer, target_tokens)
    was_training = model.training
    model.eval()
    results, started = [], time.time()
    try:
        for prompt, key in passkey_prompts(n_garbage, trials, seed):
            results.append(passkey_trial(model, tokenizer, prompt, key, **generate_kwargs))
    finally:
        model.train(was_training)
    correct = sum(r["correct"] for r in results)
    return dict(
        target_tokens=target_tokens, n_garbage=n_garbage, trials=trials, correct=correct,
        accuracy=correct / max(trials, 1),
        mean_prompt_tokens=sum(r["prompt_tokens"] for r in results) / max(trials, 1),
        seconds=time.time() - started, results=results,
    )


def passkey_curve(model, tokenizer, lengths, trials: int = 20, seed: int = 0, verbose: bool = True,
                  **generate_kwargs) -> list[dict]:
    """`passkey_accuracy` for each target token length (without the per-trial details)."""
    rows = []
    for length in lengths:
        row = passkey_accuracy(model, tokenizer, length, trials=trials, seed=seed, **generate_kwargs)
        row.pop("results")
        rows.append(row)
        if verbose:
            print(f"{length:>8} tokens (mean {row['mean_prompt_tokens']:.0f}): accuracy {row['accuracy']:.2f} "
                  f"({row['correct']}/{row['trials']}) in {row['seconds']:.1f}s", flush=True)
    return rows


__all__ = [
    "FILLER",
    "INFO_TEMPLATE",
    "QUESTION",
    "TASK_DESCRIPTION",
    "answer_ids",
    "chars_per_token",
    "fixed_prompt_tokens",
    "make_passkey_prompt",
    "n_garbage_for_tokens",
    "passkey_accuracy",
    "passkey_curve",
    "passkey_prompts",
    "passkey_trial",
]
