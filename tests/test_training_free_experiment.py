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
    assert set(trials["settings"]) == {"default", "mem_distance=300,mem_sink_tokens=8"}
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
