"""Passkey retrieval (docs/semantics.md, "Passkey evaluation"): exact prompt format, sampling, token-length calibration, scoring."""

import random
import re

import pytest
import torch

from knn_longllama.passkey import (
    FILLER, INFO_TEMPLATE, QUESTION, TASK_DESCRIPTION, answer_ids, chars_per_token, make_passkey_prompt,
    n_garbage_for_tokens, passkey_accuracy, passkey_prompts, passkey_trial, repeated_filler,
)

from conftest import tiny_model

SPEC_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
             "I will quiz you about the important information there.")
SPEC_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SPEC_QUESTION = "What is the pass key? The pass key is"


class CharTokenizer:
    """One token per character (id = code point, BOS = 1): enough for the passkey helpers."""

    pad_token_id = 0
    bos_token_id = 1

    class _Encoded(dict):
        __getattr__ = dict.__getitem__

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([self.bos_token_id] if add_special_tokens else []) + [ord(c) for c in text]
        if return_tensors == "pt":
            return self._Encoded(input_ids=torch.tensor([ids]))
        return self._Encoded(input_ids=ids)

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i > 1)


class OracleModel(torch.nn.Module):
    """Reads the key from the prompt and 'generates' it (optionally with its last digit wrong)."""

    def __init__(self, tokenizer, wrong_last_digit=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.wrong = tokenizer, wrong_last_digit
        self.calls = []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=None, do_sample=None, **kwargs):
        self.calls.append(dict(max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs))
        key = re.search(r"The pass key is (\d+)\.", self.tokenizer.decode(input_ids[0].tolist())).group(1)
        if self.wrong:
            key = key[:-1] + str((int(key[-1]) + 1) % 10)
        new = torch.tensor([answer_ids(self.tokenizer, int(key))])
        return torch.cat([input_ids, new[:, :max_new_tokens]], dim=1)


def test_spec_strings():
    assert TASK_DESCRIPTION == SPEC_TASK
    assert FILLER == SPEC_FILLER
    assert QUESTION == SPEC_QUESTION
    assert INFO_TEMPLATE.format(key=4711) == "The pass key is 4711. Remember it. 4711 is the pass key."


def test_prompt_is_five_parts_joined_by_newlines():
    n_garbage = 1000
    for seed in range(20):
        prompt, key = make_passkey_prompt(n_garbage, random.Random(seed))
        parts = prompt.split("\n")
        assert len(parts) == 5
        task, prefix, info, suffix, question = parts
        assert task == SPEC_TASK and question == SPEC_QUESTION
        assert info == f"The pass key is {key}. Remember it. {key} is the pass key."
        assert 1 <= key < 50000
        # the filler is repeated and cut by characters; prefix + suffix = n_garbage characters
        assert len(prefix) + len(suffix) == n_garbage
        repeated = " ".join([SPEC_FILLER] * 20)
        assert repeated.startswith(prefix) and repeated.startswith(suffix)


def test_prompt_sampling_is_seeded_and_uniform_enough():
    a = [make_passkey_prompt(500, random.Random(7)) for _ in range(2)]
    assert a[0] == a[1]
    rng = random.Random(0)
    prefixes, keys = [], []
    for _ in range(2000):
        prompt, key = make_passkey_prompt(500, rng)
        prefixes.append(len(prompt.split("\n")[1]))
        keys.append(key)
    assert min(prefixes) <= 5 and max(prefixes) >= 495  # uniform in [0, n_garbage]
    assert abs(sum(prefixes) / len(prefixes) - 250) < 15
    assert min(keys) < 1000 and max(keys) > 49000 and all(1 <= k < 50000 for k in keys)


def test_repeated_filler_cuts_by_characters():
    assert repeated_filler(0) == ""
    assert repeated_filler(10) == SPEC_FILLER[:10]
    assert repeated_filler(len(SPEC_FILLER) + 5) == SPEC_FILLER + " " + SPEC_FILLER[:4]


def test_token_length_calibration():
    tokenizer = CharTokenizer()
    assert chars_per_token(tokenizer) == 1.0
    for target in (300, 1000, 4000):
        n_garbage = n_garbage_for_tokens(tokenizer, target)
        prompt, key = make_passkey_prompt(n_garbage, random.Random(0))
        assert abs(len(tokenizer(prompt).input_ids) - target) <= 5


def test_scoring_compares_generated_ids_with_answer_ids():
    tokenizer = CharTokenizer()
    oracle = OracleModel(tokenizer)
    result = passkey_accuracy(oracle, tokenizer, target_tokens=600, trials=20, seed=0)
    assert result["accuracy"] == 1.0 and result["correct"] == 20 and result["trials"] == 20
    assert abs(result["mean_prompt_tokens"] - 600) < 10
    for call, trial in zip(oracle.calls, result["results"]):
        # greedy, as many new tokens as the answer has
        assert call["do_sample"] is False and call["max_new_tokens"] == len(trial["answer"]) == len(f" {trial['key']}")
    wrong = passkey_accuracy(OracleModel(tokenizer, wrong_last_digit=True), tokenizer, 600, trials=20, seed=0)
    assert wrong["accuracy"] == 0.0
    # same seed and length: the same keys for every model
    assert [r["key"] for r in wrong["results"]] == [r["key"] for r in result["results"]]
    other_seed = passkey_accuracy(oracle, tokenizer, 600, trials=20, seed=1)
    assert [r["key"] for r in other_seed["results"]] != [r["key"] for r in result["results"]]


def test_passkey_prompts_are_the_evaluations_trials():
    """Every caller gets the evaluation's prompts: trial i depends on (seed, n_garbage) only, not on the count."""
    tokenizer = CharTokenizer()
    oracle = OracleModel(tokenizer)
    result = passkey_accuracy(oracle, tokenizer, target_tokens=600, trials=4, seed=2)
    prompts = list(passkey_prompts(result["n_garbage"], 4, seed=2))
    assert [key for _, key in prompts] == [r["key"] for r in result["results"]]
    assert [len(tokenizer(p).input_ids) for p, _ in prompts] == [r["prompt_tokens"] for r in result["results"]]
    assert list(passkey_prompts(result["n_garbage"], 2, seed=2)) == prompts[:2]
    assert list(passkey_prompts(result["n_garbage"], 4, seed=3)) != prompts
    # another key line keeps the draws (prefix length, key) of the same trials
    template = "The pass key is {key}. Remember it."
    for (plain, key), (other, other_key) in zip(prompts, passkey_prompts(result["n_garbage"], 4, 2,
                                                                        info_template=template)):
        assert other_key == key and other == plain.replace(INFO_TEMPLATE.format(key=key), template.format(key=key))


def test_runs_with_a_real_longllama_across_windows():
    """An (untrained) LongLLaMA with memory goes through the whole path: windows, memory, generate, scoring."""
    tokenizer = CharTokenizer()
    model = tiny_model(vocab_size=128, max_position_embeddings=64, last_context_length=32, mem_layers=[1])
    prompt, key = make_passkey_prompt(200, random.Random(0))
    trial = passkey_trial(model, tokenizer, prompt, key)
    assert trial["prompt_tokens"] > 4 * 64
    assert len(trial["generated"]) == len(trial["answer"]) == len(f" {key}")  # the space is a token here
    assert trial["correct"] == (trial["generated"] == trial["answer"])
    result = passkey_accuracy(model, tokenizer, 300, trials=2, seed=0)
    again = passkey_accuracy(model, tokenizer, 300, trials=2, seed=0)
    assert [r["generated"] for r in result["results"]] == [r["generated"] for r in again["results"]]
    assert not model.training


@pytest.mark.parametrize("key", [1, 7, 49999])
def test_answer_ids_follow_the_question(key):
    """The ids after "... The pass key is" when the text goes on with " K": a tokenizer that keeps the space apart
    (this one, byte-level BPE) must generate it too."""
    assert answer_ids(CharTokenizer(), key) == [ord(c) for c in f" {key}"]


def test_answer_ids_are_the_key_alone_for_sentencepiece_as_officially():
    from knn_longllama.demo import load_demo

    _, tokenizer = load_demo()
    for key in range(1, 50000, 97):
        assert answer_ids(tokenizer, key) == tokenizer(str(key), add_special_tokens=False).input_ids
