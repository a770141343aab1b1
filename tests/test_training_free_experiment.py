"""experiments/training_free.py on the demo model at a tiny length: a row per trial in the results table, and the
results page's section. Marked slow."""

import pytest

from experiments import common, training_free, update_readme

pytestmark = pytest.mark.slow


def test_rows_and_page(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    training_free.main(["--model", "demo", "--lengths", "400", "--trials", "2", "--settings", "",
                        "mem_distance=300,mem_sink_tokens=8", "--memory", "exact k=8", "exact k=2 block=16",
                        "--run", "smoke"])
    trials = common.table("training_free")
    assert len(trials) == 2 * 2 * 2
    assert set(trials["settings"]) == {"mem_distance=none,mem_sink_tokens=0", "mem_distance=300,mem_sink_tokens=8"}
    assert set(trials["memory_spec"]) == {"exact k=8", "exact k=2 block=16"}
    assert trials["correct"].isin([0, 1]).all() and (trials["prompt_tokens"] > 300).all()
    section = "\n".join(update_readme.training_free_section())
    assert "| demo | mem_distance=300,mem_sink_tokens=8 | exact k=2 block=16 | 400 |" in section


@pytest.mark.parametrize("text, expected", [
    ("", {}), ("mem_distance=1024,mem_sink_tokens=64", {"mem_distance": 1024, "mem_sink_tokens": 64}),
    ("mem_layers=2-4,mem_distance=none", {"mem_layers": [2, 3, 4], "mem_distance": None}),
])
def test_settings_are_parsed(text, expected):
    assert training_free.parse_settings(text) == expected


def test_bad_settings_name_the_item():
    with pytest.raises(ValueError, match="'mem_distance'"):
        training_free.parse_settings("mem_distance")


def test_first_trial_continues_a_point(tmp_path, monkeypatch):
    """--first-trial N measures trials N.. of the same seeded prompts, so a later run adds to a point."""
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    training_free.main(["--model", "demo", "--lengths", "400", "--trials", "2", "--memory", "exact k=8", "--run", "a"])
    training_free.main(["--model", "demo", "--lengths", "400", "--trials", "1", "--first-trial", "1",
                        "--memory", "exact k=8", "--run", "b"])
    trials = common.table("training_free")
    first, again = trials[trials["run"] == "a"].set_index("trial"), trials[trials["run"] == "b"].set_index("trial")
    assert list(again.index) == [1]
    assert again.loc[1, "prompt_tokens"] == first.loc[1, "prompt_tokens"]
    assert again.loc[1, "generated"] == first.loc[1, "generated"]


def test_grouping_is_parsed():
    assert training_free.parse_settings("mem_attention_grouping=9x64") == {"mem_attention_grouping": (9, 64)}


def test_block_retrieval_finds_the_key_when_every_block_is_retrieved(tmp_path, monkeypatch):
    """experiments/block_retrieval.py: with k above the number of blocks every lookup offers the key line (hits 1);
    the key span it reports decodes to the key line."""
    from experiments import block_retrieval
    from knn_longllama.demo import load_demo
    from knn_longllama.passkey import n_garbage_for_tokens, passkey_prompts

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    rows = block_retrieval.run("demo", "", "exact k=1000 block=16", [2048], 1, 0, 0, 1, "all")
    rows += block_retrieval.run("demo", "", "exact k=1 block=16", [2048], 1, 0, 0, 1, "one")
    assert rows[0]["final_hits"] == 1.0 and rows[0]["decode_hits"] == 1.0 and rows[0]["missed_layers"] == "-"
    assert rows[1]["final_hits"] < 1.0 and rows[1]["memory_tokens"] == rows[0]["memory_tokens"]
    assert len(common.table("block_retrieval")) == 2
    section = "\n".join(update_readme.block_retrieval_section())
    assert "| demo | default | exact k=1000 block=16 | 2048 | 0 |" in section
    _, tokenizer = load_demo()
    prompt, key = next(iter(passkey_prompts(n_garbage_for_tokens(tokenizer, 2048), 1, 0)))
    start, stop = block_retrieval.key_span(tokenizer, prompt, key, 0)
    assert tokenizer.decode(tokenizer(prompt)["input_ids"][start:stop]).strip() == f"The pass key is {key}."
