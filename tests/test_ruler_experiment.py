"""experiments/ruler.py at a tiny length: the demo model through its memory, and the in-context baseline on a tiny
random LLaMA folder; rows per sample in the results table, and the results page's RULER section. Marked slow."""

import json
import shutil

import pandas as pd
import pytest

from experiments import common, ruler, update_readme

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    return tmp_path / "results"


@pytest.fixture()
def llama_folder(tmp_path):
    """A tiny random transformers LlamaForCausalLM with the demo model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from knn_longllama.demo import demo_path

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    folder = tmp_path / "llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(f"{demo_path()}/{name}", folder / name)
    return str(folder)


def test_ruler_rows_and_page(results, llama_folder, capsys):
    ruler.main(["--model", "demo", "--memory", "exact k=8", "--lengths", "1024", "--tasks", "niah_single_1", "vt",
                "--samples", "2", "--run", "t1"])
    ruler.main(["--model", llama_folder, "--in-context", "--lengths", "1024", "1200", "--tasks", "niah_single_1",
                "--samples", "1", "--run", "t2", "--label", "tiny in context"])
    ruler.main(["--model", "demo", "--memory", "exact k=8", "--lengths", "1024", "--tasks", "vt", "--first-sample",
                "1", "--samples", "1", "--run", "t3"])  # sample 1 again: counts once, its last run
    assert "| average |" in capsys.readouterr().out
    rows = common.table("ruler_sample")
    assert list(zip(rows["run"], rows["setting"], rows["task"], rows["tokens"], rows["sample"])) == [
        ("t1", "memory exact k=8", "niah_single_1", 1024, 0), ("t1", "memory exact k=8", "vt", 1024, 0),
        ("t1", "memory exact k=8", "niah_single_1", 1024, 1), ("t1", "memory exact k=8", "vt", 1024, 1),
        ("t2", "tiny in context", "niah_single_1", 1024, 0), ("t2", "tiny in context", "niah_single_1", 1200, 0),
        ("t3", "memory exact k=8", "vt", 1024, 1)]
    assert set(rows["score"]) <= {0, 0.2, 0.4, 0.6, 0.8, 1} and (rows["prompt_tokens"] <= 1200).all()
    assert (rows[rows["run"] != "t2"]["memory_spec"] == "exact k=8").all() and (rows["window"].astype(str) != "").all()
    assert [len(json.loads(d)) for d in rows["depth"]] == [1, 5, 1, 5, 1, 1, 5]
    page = "\n".join(update_readme.ruler_section())
    assert "| demo | memory exact k=8 | vt | " in page and "(2) |" in page  # two distinct samples of vt
    assert "| demo | memory exact k=8 | average | " in page and "| tiny in context | niah_single_1 |" in page
    assert (results / "ruler.png").exists()
    expected = rows.drop_duplicates(["setting", "task", "tokens", "sample"], keep="last")
    mean = 100 * expected[(expected["setting"] == "memory exact k=8") & (expected["task"] == "vt")]["score"].mean()
    assert f"| demo | memory exact k=8 | vt | {mean:.0f} (2) |" in page


def test_bad_arguments():
    with pytest.raises(SystemExit):
        ruler.parse_args(["--in-context", "--memory", "dense"])
    with pytest.raises(SystemExit):
        ruler.parse_args(["--set", "not an assignment"])
    args = ruler.parse_args(["--set", "last_context_length=256", "mem_layers=\"all\"", "x=abc"])
    assert dict(args.set) == {"last_context_length": 256, "mem_layers": "all", "x": "abc"}
    assert pd.api.types.is_list_like(args.tasks) and len(args.tasks) == 9
