"""experiments/train_demo_model.py end to end at a toy size: a run from scratch, then a re-windowed continuation of
it, and the model card that must describe (and give the commands for) both stages; the passkey evaluation runs
in a process pool."""

import json
import os
import subprocess
import sys

import pytest

from experiments.train_demo_model import OTHER_WORDINGS, DemoData, single_copy_line
from knn_longllama.demo import load_demo
from knn_longllama.passkey import INFO_TEMPLATE

pytestmark = pytest.mark.slow  # an experiment script: `python -m pytest -m "not slow"` leaves it out
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--hidden", "32", "--layers", "2", "--heads", "2", "--ffn", "64", "--mem-layers", "1", "--chunks", "2",
       "--streams-per-batch", "1", "--warmup", "1", "--threads", "1", "--eval-lengths", "--trials", "1"]


def _run(*args):
    done = subprocess.run([sys.executable, "-m", "experiments.train_demo_model", *TOY, *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def test_continuation_chain_and_model_card(tmp_path):
    stage1, stage2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    _run("--out", stage1, "--window", "32", "--last-context", "16", "--copy-steps", "2", "--steps", "3")
    _run("--out", stage2, "--init-from", stage1, "--window", "64", "--last-context", "32", "--steps", "2",
         "--eval-lengths", "100", "200", "--nomem-lengths", "100", "--eval-jobs", "2", "--seed", "5",
         "--single-copy", "1", "--mem-positionals", "false", "--mem-layers", "0", "1")

    for name in ("tokenizer.json", "tokenizer.model"):  # a continuation keeps its checkpoint's tokenizer
        with open(os.path.join(stage1, name), "rb") as a, open(os.path.join(stage2, name), "rb") as b:
            assert a.read() == b.read(), name

    with open(os.path.join(stage2, "config.json")) as f:
        config = json.load(f)
    assert (config["max_position_embeddings"], config["last_context_length"]) == (64, 32)
    assert config["mem_positionals"] is False and config["mem_layers"] == [0, 1]
    with open(os.path.join(stage1, "config.json")) as f:
        config1 = json.load(f)
    assert config1["mem_positionals"] is True and config1["mem_layers"] == [1]
    with open(os.path.join(stage2, "training_summaries_earlier.json")) as f:
        earlier = json.load(f)
    with open(os.path.join(stage1, "training_summary.json")) as f:
        assert earlier == [json.load(f)]  # the first stage's summary, as it wrote it

    card = open(os.path.join(stage2, "MODEL_CARD.md")).read()
    commands = card.split("```\n")[2].splitlines()  # the block after the usage example
    assert len(commands) == 2
    assert "--window 32" in commands[0] and commands[0].endswith("--out /tmp/demo_stage1")
    assert "--init-from /tmp/demo_stage1" in commands[1] and "--window 64" in commands[1]
    assert "--copy-steps 2" in commands[0] and "--steps 3" in commands[0] and "--steps 2" in commands[1]
    with open(os.path.join(stage2, "passkey_results.json")) as f:  # evaluated by a pool of 2 processes
        results = json.load(f)
    assert {name: [r["target_tokens"] for r in rows] for name, rows in results.items()} == {
        "dense": [100, 200], "faiss": [100, 200], "no_memory": [100]}
    assert all(r["trials"] == 1 and r["correct"] in (0, 1) for rows in results.values() for r in rows)
    assert "Stage 2, the stage 1 checkpoint re-windowed: `max_position_embeddings` 32 -> **64**" in card
    assert "with memory layers [1] -> **[0, 1]**" in card and "--mem-layers 0 1" in commands[1]
    assert "`mem_positionals` set to **false**" in card and "--mem-positionals false" in commands[1]
    assert "(none in memory layers: `mem_positionals` false)" in card
    assert "with the key stated once in 100% of the passkey prompts" in card


def test_single_copy_passkey_documents():
    """--single-copy: the key line states the key once (the official line states it twice)."""
    assert single_copy_line(INFO_TEMPLATE) == "The pass key is {key}. Remember it."
    for template, _ in OTHER_WORDINGS:
        line = single_copy_line(template)
        assert line.count("{key}") == 1 and template.startswith(line.split("{key}")[0])
    _, tokenizer = load_demo()
    austen = list(range(300, 900)) * 20
    for share, copies in [(0.0, 2), (1.0, 1)]:
        data = DemoData(tokenizer, austen, 1024, 256, seed=0, single_copy=share)
        for _ in range(10):
            text, spans = data.passkey_doc(600)
            key = text[spans[0][0]:].strip()
            body = text[: spans[0][0]]  # the prompt without the answer
            assert body.count(key) == copies, (share, body[-300:])


def test_memory_copy_stream_repeats_only_out_of_memory():
    """`memcopy`: every weighted token continues a digit group whose only earlier occurrence lies at least a chunk
    before, so predicting it needs memory (no copy of it in the same window)."""
    _, tokenizer = load_demo()
    digits = {tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}
    austen = [t for t in range(300, 900) if t not in digits] * 20
    data = DemoData(tokenizer, austen, 1024, 256, seed=1, answer_weight=5.0)
    for _ in range(20):
        stream = data.stream("memcopy")
        ids, weights = stream["input_ids"], stream["loss_weights"]
        assert len(ids) == len(weights) == 1024
        weighted = [i for i, w in enumerate(weights) if w > 1]
        assert len(weighted) >= 9  # at least 3 groups of 4+ digits
        runs, start = [], weighted[0]
        for a, b in zip(weighted, weighted[1:] + [None]):
            if b != a + 1:
                runs.append((start - 1, a + 1))  # the repeat: its unweighted first digit, then the weighted ones
                start = b
        for a, b in runs:
            group = ids[a:b]
            assert set(group) <= digits and 4 <= len(group) <= 10
            before = [p for p in range(a) if ids[p : p + len(group)] == group]
            assert len(before) == 1 and before[0] + 256 <= a, (a, before)
            assert not (ids[a - 1] in digits or (b < len(ids) and ids[b] in digits))  # a whole group
