"""The README's Python examples run as written (the ones that need no checkpoint folders or training data; the
document example reads a book.txt that the test writes)."""

import os
import random
import re

import torch

from knn_longllama.passkey import QUESTION, make_passkey_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block(marker: str) -> str:
    """The one ```python block of README.md that contains `marker`."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"{len(found)} README python blocks contain {marker!r}"
    return found[0]


def test_quick_start_runs(capsys):
    block = readme_block("A small random model")
    namespace = {}
    exec(compile(block, "README quick start", "exec"), namespace)
    out, new, ids = namespace["out"], namespace["new"], namespace["ids"]
    assert out.logits.shape == (1, 4000, 1000) and new.shape == (1, 4020) and torch.equal(new[:, :4000], ids)
    in_memory = re.search(r"# (\d+) tokens go to memory", block).group(1)  # what the example's comment says
    assert capsys.readouterr().out.split()[-3:] == [in_memory, "torch.Size([1,", "4020])"]


def test_document_example_runs(tmp_path, monkeypatch, capsys):
    prompt, key = make_passkey_prompt(6000, random.Random(1))  # ~2500 tokens of the demo tokenizer
    book = prompt[: -len(QUESTION)]
    (tmp_path / "book.txt").write_text(book)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_block("book.memory"), "README document example", "exec"), namespace)
    answer = capsys.readouterr().out
    assert str(key) in answer  # the demo model finds the key from memory at this length
    reloaded = namespace["doc"]
    assert (tmp_path / "book.memory").is_file()
    assert reloaded.ask("What is the pass key? The pass key is", max_new_tokens=6, do_sample=False) in answer
