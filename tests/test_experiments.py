"""The experiment runner (experiments/run_experiments.py) end to end at a tiny scale on CPU, including the code
paths of its GPU variant (`--device`, exact torch top-k), so the scripts behind the README's numbers do not rot."""

import csv
import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def runner(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_experiments", os.path.join(ROOT, "experiments", "run_experiments.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", str(tmp_path))
    module.SCALES["tiny"] = module.Scale(
        name="tiny", passkey_lengths=[200], dense_max=200, trials=2,
        indices={"torch": ("torch", {}), "IVF4,Flat": ("IVF4,Flat", {"nprobe": 2})},
        # recall_tokens: enough keys (1024) for IVF4 to train, so that nprobe changes what recall finds
        ks=[8], depth_length=200, depths=[0.0, 1.0], ingest_lengths=[1000], decode_sizes=[1000], recall_tokens=1600,
        recall_sweep={"IVF4,Flat": ("IVF4,Flat", "nprobe", [1, 4]),
                      "IVF4,Flat l2": ("IVF4,Flat", "nprobe", [1, 4], {"faiss_metric": "l2"})},
    )
    return module


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_memory_settings(runner):
    scale = runner.SCALES["tiny"]
    assert runner.memory_settings("dense", scale) == {"memory_spec": "dense", "torch_attention": False}
    assert runner.memory_settings("dense sdpa", scale) == {"memory_spec": "dense", "torch_attention": True}
    assert runner.memory_settings("torch", scale, 8) == {"memory_spec": "exact k=8", "torch_attention": False}
    assert runner.memory_settings("IVF4,Flat", scale, 8) == {"memory_spec": "IVF4,Flat k=8 nprobe=2",
                                                             "torch_attention": False}
    pq = runner.replace(scale, indices={"PQ": ("IVF4,PQ4x4", {"nprobe": 2, "k_factor": 4, "faiss_metric": "l2"})})
    assert runner.memory_settings("PQ", pq, 8) == {  # k_factor and faiss_metric are memory settings, not Faiss ones
        "memory_spec": "IVF4,PQ4x4 k=8 k_factor=4 metric=l2 nprobe=2", "torch_attention": False}
    assert pq.indices["PQ"][1] == {"nprobe": 2, "k_factor": 4, "faiss_metric": "l2"}  # the scale is left as it was


def test_children_on_cpu(runner):
    n = 1000  # > window (256) + last_context_length (128): whole windows go to memory
    dense = runner.read_child("dense", n, "tiny", decode=False)
    assert set(dense) == {"ingest"}
    knn = runner.read_child("IVF4,Flat", n, "tiny", decode=True)
    for row in (dense["ingest"], knn["ingest"]):
        assert row["tokens"] == n and row["seconds"] > 0 and row["peak_rss_mb"] > 0 and row["memory_mb"] > 0
    decode = knn["decode"]  # decoding against the memory that the same read filled
    assert decode["index"] == "IVF4,Flat" and decode["memory_tokens"] == n and decode["ms_per_token"] > 0
    assert abs(decode["read_seconds"] - knn["ingest"]["seconds"]) <= 0.0051  # the same read, rounded to 2 places


def test_ingest_and_decode_share_each_read(runner, tmp_path, monkeypatch):
    calls = []

    def child(args):  # in-process children, counted
        calls.append(args[:4])
        return runner.read_child(args[2], int(args[3]), args[4], decode=args[1] == "read")

    monkeypatch.setattr(runner, "run_child", child)
    scale = runner.SCALES["tiny"]
    runner.exp_ingest(scale)
    runner.exp_decode(scale)
    assert calls == [["--child", "read", "torch", "1000"], ["--child", "read", "IVF4,Flat", "1000"]]  # dense > dense_max
    ingest, decode = _rows(tmp_path / "ingest_tiny.csv"), _rows(tmp_path / "decode_tiny.csv")
    assert [(r["index"], r["tokens"]) for r in ingest] == [("torch", "1000"), ("IVF4,Flat", "1000")]
    assert [(r["index"], r["memory_tokens"]) for r in decode] == [("torch", "1000"), ("IVF4,Flat", "1000")]
    for i, d in zip(ingest, decode):
        assert abs(float(d["read_seconds"]) - float(i["seconds"])) <= 0.0051


def test_ingest_times_both_dense_variants(runner, tmp_path, monkeypatch):
    """`dense_sdpa`: ingestion times dense memory with the official matmul and with fused SDPA, up to dense_max;
    both read the same tokens into the same memory."""
    monkeypatch.setattr(runner, "run_child", lambda args: runner.read_child(args[2], int(args[3]), args[4], decode=False))
    scale = runner.replace(runner.SCALES["tiny"], dense_max=1000, dense_sdpa=True, indices={}, decode_sizes=[])
    runner.exp_ingest(scale)
    rows = _rows(tmp_path / "ingest_tiny.csv")
    assert [(r["index"], r["tokens"], r["search"]) for r in rows] == [("dense", "1000", "dense"),
                                                                      ("dense sdpa", "1000", "dense")]
    assert rows[0]["memory_mb"] == rows[1]["memory_mb"]


def test_passkey_and_recall_tables(runner, tmp_path):
    scale = runner.SCALES["tiny"]
    runner.exp_passkey(scale)
    rows = _rows(tmp_path / "passkey_tiny.csv")
    trials = _rows(tmp_path / "passkey_trials_tiny.csv")
    for r in rows:  # every point's trials, one row each, adding up to its accuracy
        mine = [t for t in trials if (t["index"], t["k"], t["tokens"]) == (r["index"], r["k"], r["tokens"])]
        assert [int(t["trial"]) for t in mine] == list(range(scale.trials))
        assert sum(int(t["correct"]) for t in mine) == round(float(r["accuracy"]) * scale.trials)
    from knn_longllama.passkey import n_garbage_for_tokens, passkey_prompts

    _, tokenizer = runner.load()
    for t in trials:  # the prompt's second line is the filler before the key line: depth * n_garbage characters
        n_garbage = n_garbage_for_tokens(tokenizer, int(t["tokens"]))
        prompt, key = list(passkey_prompts(n_garbage, scale.trials, int(t["seed"])))[int(t["trial"])]
        assert int(t["key"]) == key and t["correct"] in ("0", "1")
        assert abs(len(prompt.split("\n")[1]) / n_garbage - float(t["depth"])) < 1e-4
    assert {(r["index"], r["k"]) for r in rows} == {("dense", "-"), ("torch", "32"), ("IVF4,Flat", "32")}
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and r["trials"] == "2" for r in rows)
    depth = _rows(tmp_path / "passkey_depth_tiny.csv")
    assert [(r["index"], float(r["depth"])) for r in depth] == [("dense", 0.0), ("dense", 1.0), ("torch", 0.0),
                                                                ("torch", 1.0)]
    assert (tmp_path / "passkey_tiny.png").stat().st_size > 0

    runner.exp_recall(scale)
    recall = _rows(tmp_path / "recall_tiny.csv")
    assert {r["index"] for r in recall} == {"IVF4,Flat"}  # exact torch top-k needs no recall row
    assert {(r["text"], r["k"]) for r in recall} == {("austen", "8"), ("passkey", "32")}  # passkey: its k only
    assert {(r["faiss_metric"], r["value"]) for r in recall if r["param"] == "nprobe"} == {
        ("ip", "1"), ("ip", "4"), ("l2", "1"), ("l2", "4")}
    for r in recall:
        assert 0.0 <= float(r["recall_at_k"]) <= 1.0
        assert float(r["attention_mass_kept"]) <= float(r["mass_of_exact_topk"]) + 1e-4  # exact top-k keeps most
    full_probe = [r for r in recall if r["param"] == "nprobe" and r["value"] == "4"]  # nprobe = nlist: exact search
    assert {r["faiss_metric"] for r in full_probe} == {"ip", "l2"}
    for r in full_probe:
        assert float(r["attention_mass_kept"]) == float(r["mass_of_exact_topk"])
        # l2 ranks by |q|^2 + |k'|^2 - 2 q.k' in float32: a near-tie at the k-th place may swap (1 of 32768 ids
        # on a fresh install of 2026-11-29), which changes no kept mass; ip ranks by q.k itself
        assert float(r["recall_at_k"]) == 1.0 if r["faiss_metric"] == "ip" else float(r["recall_at_k"]) >= 0.999


def test_flat_k_sweep_stops_at_its_length(runner, tmp_path):
    """`k_sweep_max`: Flat's ks other than 32 run only up to that length; k=32 and dense run at every length."""
    scale = runner.replace(runner.SCALES["tiny"], passkey_lengths=[150, 300], dense_max=300, trials=1, depths=[],
                           indices={"Flat": ("Flat", {})}, ks=[8, 32], k_sweep_max=150)
    runner.exp_passkey(scale)
    points = {(r["index"], r["k"], int(r["tokens"])) for r in _rows(tmp_path / "passkey_tiny.csv")}
    assert points == {("dense", "-", 150), ("dense", "-", 300), ("Flat", "8", 150), ("Flat", "32", 150),
                      ("Flat", "32", 300)}


def test_passkey_runs_fused_dense_only_when_asked_for_alone(runner, tmp_path, monkeypatch):
    """`--indices 'dense sdpa' ...`: the passkey sweeps read dense memory with fused SDPA (same answers, faster);
    with the official dense also asked for, only that one runs. No kNN index: the depth sweep is dense only."""
    configured = []
    configure = runner.configure
    monkeypatch.setattr(runner, "configure", lambda model, settings: (configured.append(settings),
                                                                      configure(model, settings)))
    scale = runner.replace(runner.SCALES["tiny"], dense=False, dense_sdpa=True, indices={})
    runner.exp_passkey(scale)
    rows = _rows(tmp_path / "passkey_tiny.csv")
    assert [(r["index"], r["search"]) for r in rows] == [("dense sdpa", "dense")]
    depth = _rows(tmp_path / "passkey_depth_tiny.csv")
    assert [(r["index"], float(r["depth"])) for r in depth] == [("dense sdpa", 0.0), ("dense sdpa", 1.0)]
    assert configured == [{"memory_spec": "dense", "torch_attention": True}] * 2  # length sweep, depth sweep
    configured.clear()
    runner.exp_passkey(runner.replace(scale, dense=True, depths=[]))
    assert [r["index"] for r in _rows(tmp_path / "passkey_tiny.csv")] == ["dense"]
    assert configured == [{"memory_spec": "dense", "torch_attention": False}]


def test_cuda_device_refused_without_gpu(runner, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr("sys.argv", ["run_experiments.py", "--device", "cuda", "--scale", "small"])
    with pytest.raises(SystemExit) as exit_info:
        runner.main()
    assert exit_info.value.code == 2
    assert "--device cuda" in capsys.readouterr().err


def test_environment_records_device(runner):
    env = runner.environment(runner.SCALES["tiny"], threads=1)
    assert env["device"] == "cpu" and env["gpu"] is None and env["threads"] == 1
    json.dumps(env)
    import hashlib

    from knn_longllama.demo import demo_path

    with open(os.path.join(demo_path(), "model.safetensors"), "rb") as f:
        assert env["model"]["weights_sha256"] == hashlib.sha256(f.read()).hexdigest()[:16]
    with open(os.path.join(demo_path(), "config.json")) as f:
        assert env["model"]["window"] == json.load(f)["max_position_embeddings"]


@pytest.fixture
def readme(tmp_path, monkeypatch):
    """experiments/update_readme.py as a module, reading results from tmp_path."""
    spec = importlib.util.spec_from_file_location("update_readme", os.path.join(ROOT, "experiments", "update_readme.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", str(tmp_path))
    return module


def test_readme_flags_results_of_another_checkpoint(readme, tmp_path):
    module = readme
    current = {"weights_sha256": "aaaa", "window": 256, "mem_layers": [2, 3]}
    old = dict(current, weights_sha256="bbbb", window=64)
    for scale, models in {"a": [current, current], "b": [current, old], "c": [None, current]}.items():
        records = {f"exp{i}": ({} if m is None else {"model": m}) for i, m in enumerate(models)}
        (tmp_path / f"environment_{scale}.json").write_text(json.dumps(records))
    assert "(the shipped one)" in module.model_line("a", current)
    line = module.model_line("b", current)
    assert "another demo checkpoint" in line and "`bbbb` (window 64)" in line
    assert "not recorded" in module.model_line("c", current)
    appended = {"ingest": {"model": current, "earlier_runs": [{"model": old}]}}  # rows of an earlier run stay
    (tmp_path / "environment_d.json").write_text(json.dumps(appended))
    assert "`bbbb` (window 64)" in module.model_line("d", current)


def test_readme_pools_tagged_passkey_runs_and_folds_their_tables(readme, tmp_path, monkeypatch):
    current = {"weights_sha256": "aaaa", "window": 256, "mem_layers": [2, 3]}
    monkeypatch.setattr(readme, "current_model", lambda: current)
    header = "index,k,tokens,prompt_tokens,search,accuracy,trials,seed,seconds\n"
    runs = {"s": 'dense,-,4096,4096,dense,1.0,5,0,1\n"IVF8,Flat",32,4096,4096,approximate,0.8,5,0,1\n',
            "s_x": '"IVF8,Flat",32,4096,4096,approximate,0.6,5,1,1\n"IVF8,Flat",32,65536,65536,approximate,1.0,2,1,1\n',
            "s_y": '"IVF8,Flat",32,65536,65536,approximate,0.5,2,2,1\n'}
    for scale, rows in runs.items():
        (tmp_path / f"passkey_{scale}.csv").write_text(header + rows)
        (tmp_path / f"passkey_{scale}.md").write_text(f"**table of {scale}**\n")
        (tmp_path / f"environment_{scale}.json").write_text(json.dumps({"passkey": {"model": current}}))
    table = readme.pooled_passkey("s")
    assert "| dense | - | 4096 | dense | 5 | 5 | 100% | 57%-100% | 0 |" in table
    assert "| IVF8,Flat | 32 | 4096 | approximate | 7 | 10 | 70% | 40%-89% | 0, 1 |" in table  # 4 of 5 + 3 of 5
    assert "| IVF8,Flat | 32 | 65536 | approximate | 3 | 4 | 75% | 30%-95% | 1, 2 |" in table
    assert readme.pooled_passkey("s_x") == ""  # a run without tagged runs of its own: its table says it all
    text = readme.section()
    folded = text[text.index("<details>"):text.index("</details>")]
    assert "table of s_x" in folded and "table of s_y" in folded and "The 2 tagged <code>s</code> runs" in folded
    assert text.index("Passkey accuracy pooled") < text.index("<details>") and "table of s**" in text.split("<details>")[0]


def test_readme_tables_seed_variants_of_a_tagged_run_as_one(readme, tmp_path, monkeypatch):
    """Tagged passkey runs that differ only in a `_seed<N>` suffix (`--tag 1m`, `--tag 1m_seed1`, ...) share one
    table with a row per seed and the pooled accuracy; their one-point plots are left out, multi-length ones kept."""
    current = {"weights_sha256": "aaaa", "window": 256}
    monkeypatch.setattr(readme, "current_model", lambda: current)
    header = "index,k,tokens,prompt_tokens,search,accuracy,trials,seed,seconds\n"
    runs = {"s_1m": '"IVF8,Flat",32,1048576,1048576,approximate,1.0,1,0,100\n',
            "s_1m_seed1": '"IVF8,Flat",32,1048576,1048576,approximate,0.0,1,1,100\n',
            "s_1m_seed2": '"IVF8,Flat",32,1048576,1048576,approximate,1.0,1,2,100\n',
            "s_2k_seed3": "dense,-,1024,1024,dense,1.0,2,3,1\ndense,-,2048,2048,dense,0.5,2,3,1\n",
            "s_2k_seed4": "dense,-,1024,1024,dense,1.0,2,4,1\ndense,-,2048,2048,dense,1.0,2,4,1\n",
            "s_other": "dense,-,1024,1024,dense,1.0,2,0,1\n"}
    for scale, rows in runs.items():
        (tmp_path / f"passkey_{scale}.csv").write_text(header + rows)
        (tmp_path / f"passkey_{scale}.md").write_text(f"**table of {scale}**\n")
        (tmp_path / f"passkey_{scale}.png").write_bytes(b"png")
        (tmp_path / f"environment_{scale}.json").write_text(json.dumps({"passkey": {"model": current}}))
    text = readme.section()
    assert "The 6 tagged <code>s</code> runs" in text
    assert text.count("### Scaling experiments (`--scale s_1m`, 3 runs over seeds 0-2)") == 1
    assert "table of s_1m" not in text and "table of s_2k" not in text and "table of s_other" in text
    assert "| IVF8,Flat | 32 | 1048576 | approximate | 1 | 0 | 1 | 100 |" in text  # seed 1's row
    assert "- IVF8,Flat, k=32, 1048576 tokens: 2 of 3 correct (67%; 95% interval 21%-94%; 3 runs)" in text
    assert "- dense, 2048 tokens: 3 of 4 correct" in text  # pooled over s_2k_seed3 and s_2k_seed4
    assert "passkey_s_1m_seed1.png" not in text and "![passkey_s_2k_seed3](results/passkey_s_2k_seed3.png)" in text
    assert "experiments/results/" not in text  # links are relative to experiments/, where the page lives
    assert "| IVF8,Flat | 32 | 1048576 | approximate | 2 | 3 |" in readme.pooled_passkey("s")  # goals still pool them


def test_update_readme_writes_the_results_page_and_a_short_headline(readme, tmp_path, monkeypatch):
    """main() writes the whole generated page and puts only a short headline table between the README's markers."""
    current = {"weights_sha256": "aaaa", "window": 256}
    monkeypatch.setattr(readme, "current_model", lambda: current)
    header = "index,k,tokens,prompt_tokens,search,accuracy,trials,seed,seconds\n"
    (tmp_path / "passkey_s_a.csv").write_text(header + "dense,-,4096,4096,dense,1.0,5,1,1\n"
                                              "dense sdpa,-,16384,16384,dense,1.0,5,1,1\n"
                                              "Flat,32,4096,4096,exact,1.0,5,1,1\n"
                                              "HNSW8,32,4096,4096,approximate,0.2,5,1,1\n"
                                              '"IVF8,Flat",32,4096,4096,approximate,0.8,5,1,1\n'
                                              '"IVF8,Flat",32,16384,16384,approximate,1.0,5,1,1\n')
    (tmp_path / "passkey_s_a.md").write_text("**table of s_a**\n")
    (tmp_path / "passkey_s_a.png").write_bytes(b"png")
    (tmp_path / "environment_s_a.json").write_text(json.dumps({"passkey": {"model": current, "scale": {
        "dense": True, "indices": {"IVF8,Flat": ["IVF8,Flat", {"nprobe": 2}]}}}}))
    readme_path, page_path = tmp_path / "README.md", tmp_path / "page.md"
    readme_path.write_text(f"intro\n{readme.BEGIN}\nold results\n{readme.END}\noutro\n")
    readme.main(str(readme_path), str(page_path))
    page = page_path.read_text()
    assert page.startswith("# Experiment results\n") and "generated by `python experiments/update_readme.py`" in page
    assert "table of s_a" in page and "![passkey_s_a](results/passkey_s_a.png)" in page
    new = readme_path.read_text()
    assert new.startswith(f"intro\n{readme.BEGIN}\n") and new.endswith(f"{readme.END}\noutro\n")
    block = new[new.index(readme.BEGIN):new.index(readme.END)]
    assert "old results" not in block and "table of s_a" not in block and ".png" not in block
    assert "[experiments/README.md](experiments/README.md)" in block
    rows = [line for line in block.splitlines() if line.startswith("| ")]
    # dense (fused where only it ran), exact Flat k=32, and the kNN settings run at several lengths (not HNSW8)
    assert rows == ["| tokens | dense | Flat k=32 | IVF8,Flat k=32 |",
                    "| 4096 | 5/5 (57%-100%) | 5/5 (57%-100%) | 4/5 (38%-96%) |",
                    "| 16384 | 5/5 (57%-100%) sdpa | - | 5/5 (57%-100%) |"]
    assert "**IVF8,Flat** = `IVF8,Flat`, nprobe 2" in block and "kNN accuracy >= dense" in block
    readme_path.write_text("no markers\n")
    with pytest.raises(SystemExit):
        readme.main(str(readme_path), str(page_path))


def test_search_mode_follows_the_training_size(runner):
    """Trainable indices search exactly until a store holds default_train_size keys (40 per centroid of the largest
    codebook, at least 1024); the runner labels every point with the search that produced it."""
    from types import SimpleNamespace

    scale = runner.replace(runner.SCALES["tiny"], indices={
        "torch": ("torch", {}), "Flat": ("Flat", {}), "HNSW8": ("HNSW8", {}), "IVF64,Flat": ("IVF64,Flat", {}),
        "IVF16,PQ4": ("IVF16,PQ4", {})})
    config = SimpleNamespace(hidden_size=128, num_attention_heads=4, last_context_length=128)
    mode = lambda label, n: runner.search_mode(label, scale, config, n)  # noqa: E731
    assert [mode(label, 10**6) for label in ("dense", "torch", "Flat", "HNSW8")] == ["dense", "exact", "exact",
                                                                                     "approximate"]
    assert mode("IVF64,Flat", 128 + 40 * 64 - 1) == "exact" and mode("IVF64,Flat", 128 + 40 * 64) == "approximate"
    assert mode("IVF16,PQ4", 128 + 40 * 256 - 1) == "exact" and mode("IVF16,PQ4", 128 + 40 * 256) == "approximate"


def test_goal_says_how_knn_points_were_searched(readme, tmp_path):
    module = readme
    (tmp_path / "passkey_s.csv").write_text(
        "index,k,tokens,prompt_tokens,search,accuracy,trials,seconds\n"
        "dense,-,2048,2048,dense,1.0,10,1\ndense,-,8192,8192,dense,0.9,10,1\n"
        "IVF64,Flat,32,2048,2048,exact,1.0,10,1\nIVF64,Flat,32,8192,8192,approximate,0.4,10,1\n".replace(
            "IVF64,Flat", '"IVF64,Flat"'))
    table = module.goals("s")
    assert ("below dense: IVF64,Flat k=32 at 8192 (4 vs 9 of 10); 10 trials a point, the same prompts for both "
            "(1 of 2 kNN points there searched approximately") in table


def test_knn_is_compared_with_dense_on_the_same_prompts(readme, tmp_path):
    """kNN against dense pools only the seeds (prompts) both ran at a length; rows without a seed ran seed 0."""
    header = "index,k,tokens,prompt_tokens,search,accuracy,trials,seed,seconds\n"
    (tmp_path / "passkey_s_a.csv").write_text(header + "dense,-,4096,4096,dense,1.0,5,1,1\n"
                                              '"IVF8,Flat",32,4096,4096,approximate,0.6,5,1,1\n')
    (tmp_path / "passkey_s_b.csv").write_text(header.replace("seed,", "") +  # seed 0: no dense run to compare with
                                              '"IVF8,Flat",32,4096,4096,approximate,1.0,5,1\n')
    (tmp_path / "passkey_s_c.csv").write_text(header + "dense,-,4096,4096,dense,0.8,5,2,1\n"
                                              '"IVF8,Flat",32,4096,4096,approximate,1.0,5,2,1\n'
                                              '"IVF8,Flat",32,16384,16384,approximate,1.0,5,2,1\n')
    row = next(line for line in readme.goals("s").splitlines() if "wherever dense runs" in line)
    # seeds 1 and 2: 3 + 5 kNN vs 5 + 4 dense of 10; seed 0 (kNN only) and 16384 (no dense) are left out
    assert "below dense: IVF8,Flat k=32 at 4096 (8 vs 9 of 10); 10 trials a point" in row and row.endswith("| no |")
    (tmp_path / "passkey_s_d.csv").write_text(header + "dense,-,4096,4096,dense,0.6,5,0,1\n")
    row = next(line for line in readme.goals("s").splitlines() if "wherever dense runs" in line)
    assert "| everywhere; 15 trials a point" in row and row.endswith("| yes |")  # 13 vs 12 of 15 with seed 0


def test_knn_is_compared_with_dense_trial_by_trial_where_trial_counts_differ(readme, tmp_path):
    """A dense run with fewer trials than the kNN run of the same seed is compared on the trials both recorded (the
    same prompts); a kNN run without trial records is then left out rather than compared with other prompts."""
    header = "index,k,tokens,prompt_tokens,search,accuracy,trials,seed,seconds\n"
    (tmp_path / "passkey_s_a.csv").write_text(header + "dense sdpa,-,8192,8192,dense,0.75,4,1,1\n")
    (tmp_path / "passkey_s_b.csv").write_text(header + '"IVF8,Flat",32,8192,8192,approximate,0.6,5,1,1\n'
                                              "Flat,32,8192,8192,exact,1.0,5,1,1\n")
    trials = "index,k,tokens,seed,trial,key,depth,correct,generated\n"
    dense = [1, 0, 1, 1]  # trial 1: dense misses
    ivf = [1, 1, 0, 0, 1]  # trials 2, 3: IVF misses; trial 4 has no dense counterpart
    (tmp_path / "passkey_trials_s_a.csv").write_text(trials + "".join(
        f"dense sdpa,-,8192,1,{t},7,0.5,{c},7\n" for t, c in enumerate(dense)))
    (tmp_path / "passkey_trials_s_b.csv").write_text(trials + "".join(
        f'"IVF8,Flat",32,8192,1,{t},7,0.5,{c},7\n' for t, c in enumerate(ivf)))
    row = next(line for line in readme.goals("s").splitlines() if "wherever dense runs" in line)
    # trials 0-3: IVF 2 of 4, dense 3 of 4; Flat (no trial records) is not compared
    assert "below dense: IVF8,Flat k=32 at 8192 (2 vs 3 of 4); 4 trials a point" in row and row.endswith("| no |")
    assert "Flat k=32 at" not in row.replace("IVF8,Flat k=32 at", "")


def test_knn_is_compared_with_fused_dense_where_only_it_ran(readme, tmp_path):
    """Dense passkey rows read with fused SDPA ("dense sdpa") stand for dense where the official variant did not run
    on those prompts; where both ran, the official one is compared with, and neither counts as a kNN index."""
    header = "index,k,tokens,prompt_tokens,search,accuracy,trials,seed,seconds\n"
    (tmp_path / "passkey_s_a.csv").write_text(header + "dense sdpa,-,262144,262144,dense,1.0,5,1,1\n"
                                              '"IVF8,Flat",32,262144,262144,approximate,0.8,5,1,1\n')
    row = next(line for line in readme.goals("s").splitlines() if "wherever dense runs" in line)
    assert "below dense: IVF8,Flat k=32 at 262144 (4 vs 5 of 5); 5 trials a point" in row and row.endswith("| no |")
    (tmp_path / "passkey_s_b.csv").write_text(header + "dense,-,262144,262144,dense,0.8,5,1,1\n")
    row = next(line for line in readme.goals("s").splitlines() if "wherever dense runs" in line)
    assert "| everywhere; 5 trials a point" in row and row.endswith("| yes |")  # 4 vs 4 of 5: the official row
    table = readme.pooled_passkey("s").splitlines()
    assert [line.split(" | ")[0] for line in table if line.startswith("| ") and "262144" in line] == [
        "| dense", "| dense sdpa", "| IVF8,Flat"]  # dense variants first


def test_knn_vs_dense_names_the_settings_that_meet_it(readme, tmp_path):
    """With several kNN settings beside dense, a setting meets the goal only if it does at every length it ran."""
    header = "index,k,tokens,prompt_tokens,search,accuracy,trials,seed,seconds\n"
    (tmp_path / "passkey_s_a.csv").write_text(header + "dense,-,4096,4096,dense,1.0,5,1,1\n"
                                              "dense,-,16384,16384,dense,1.0,5,1,1\n"
                                              '"IVF8,Flat",32,4096,4096,approximate,0.8,5,1,1\n'
                                              '"IVF8,Flat np8",32,4096,4096,approximate,1.0,5,1,1\n'
                                              '"IVF8,Flat np8",32,16384,16384,approximate,1.0,5,1,1\n'
                                              "Flat,32,4096,4096,exact,1.0,5,1,1\n"
                                              "Flat,32,16384,16384,exact,0.8,5,1,1\n")
    row = next(line for line in readme.goals("s").splitlines() if "wherever dense runs" in line)
    assert "below dense: IVF8,Flat k=32 at 4096 (4 vs 5 of 5), Flat k=32 at 16384 (4 vs 5 of 5)" in row
    assert row.endswith("| with IVF8,Flat np8 k=32; not with Flat k=32, IVF8,Flat k=32 |")  # by name, then k


def test_index_legend_reads_what_the_runs_recorded(readme, tmp_path):
    """The labels' meaning comes from the runs' environment records (tagged runs and earlier --append runs too)."""
    def record(indices, dense=False, earlier=()):
        return {"scale": {"dense": dense, "indices": indices}, "earlier_runs": list(earlier)}

    (tmp_path / "environment_s.json").write_text(json.dumps({"passkey": record(
        {"IVF8,Flat": ["IVF8,Flat", {"nprobe": 2}]}, dense=True, earlier=[record({"Flat": ["Flat", {}]})])}))
    (tmp_path / "environment_s_np4.json").write_text(json.dumps({"passkey": record(
        {"IVF8,Flat np4": ["IVF8,Flat", {"nprobe": 4, "faiss_metric": "l2"}]})}))
    (tmp_path / "environment_small.json").write_text(json.dumps({"passkey": record({"HNSW8": ["HNSW8", {}]})}))
    legend = readme.index_legend("s")
    assert legend == ("Memory labels: **Flat** = `Flat`; **IVF8,Flat** = `IVF8,Flat`, nprobe 2; **IVF8,Flat np4** = "
                      "`IVF8,Flat`, nprobe 4, faiss_metric l2; **dense** = attention to every memory entry (the "
                      "official LongLLaMA memory).\n")  # environment_small.json is another scale
    assert readme.index_legend("t") == ""


def test_depth_table_bins_every_recorded_trial(readme, tmp_path):
    header = "index,k,tokens,seed,trial,key,depth,correct,generated\n"
    (tmp_path / "passkey_trials_s.csv").write_text(header + "Flat,32,4096,0,0,11,0.0,1,11\n"
                                                   "Flat,32,4096,0,1,12,0.19,0,7\nFlat,32,4096,0,2,13,1.0,1,13\n")
    (tmp_path / "passkey_trials_s_seed1.csv").write_text(header + "Flat,32,4096,1,0,14,0.2,1,14\n"
                                                         "dense,-,4096,1,0,14,0.5,1,14\n")
    (tmp_path / "passkey_trials_small.csv").write_text(header + "Flat,32,4096,0,0,11,0.5,0,1\n")  # another scale
    table = readme.depth_of_recorded_trials("s")
    assert "| Flat | 32 | 4096 | 1/2 | 1/1 | - | - | 1/1 |" in table  # depth 1.0 falls in the last bin
    assert "| dense | - | 4096 | - | - | 1/1 | - | - |" in table
    assert readme.depth_of_recorded_trials("t") == ""


def test_ingest_goal_extrapolates_dense_beyond_where_it_ran(readme, tmp_path):
    module = readme
    (tmp_path / "ingest_s.csv").write_text(
        "index,tokens,search,seconds,us_per_token,peak_rss_mb,memory_mb,time_exponent\n"
        "dense,1000,dense,2,1,1,1,2\ndense,4000,dense,32,1,1,1,2\n"
        '"IVF8,Flat",1000,exact,1,1,1,1,1.2\n"IVF8,Flat",4000,approximate,4,1,1,1,1.2\n'
        '"IVF8,Flat",16000,approximate,16,1,1,1,1.2\n')
    table = module.goals("s")
    # side by side at 4000 tokens: 32 / 4 = 8x; at 16000 dense would take 32 * 4^2 = 512 s, IVF took 16 s: 32x
    assert "8.0x at 4000 tokens (largest length dense ran)" in table
    assert "at 16000 tokens IVF8,Flat took 16 s, dense extrapolated quadratically ~512 s, so ~32x" in table
    assert "| not measured at this scale |" in table.split("ingestion")[1].splitlines()[0]


def test_ingest_goal_compares_with_the_faster_dense_variant(readme, tmp_path):
    """With "dense" and "dense sdpa" both timed, the IVF ratio and the extrapolation use the faster at each length."""
    (tmp_path / "ingest_s.csv").write_text(
        "index,tokens,search,seconds,us_per_token,peak_rss_mb,memory_mb,time_exponent\n"
        "dense,1000,dense,2,1,1,1,2\ndense,4000,dense,32,1,1,1,2\n"
        "dense sdpa,1000,dense,1,1,1,1,2\ndense sdpa,4000,dense,12,1,1,1,2\n"
        '"IVF8,Flat",1000,exact,1,1,1,1,1.2\n"IVF8,Flat",4000,approximate,4,1,1,1,1.2\n'
        '"IVF8,Flat",16000,approximate,16,1,1,1,1.2\n')
    table = readme.goals("s")
    # 12 / 4 = 3x at 4000 tokens; at 16000 the faster dense would take 12 * 4^2 = 192 s against IVF's 16 s: 12x
    assert "3.0x at 4000 tokens (largest length dense ran; against dense sdpa, the faster of dense and dense sdpa)" in table
    assert "dense extrapolated quadratically ~192 s, so ~12x" in table
    exponents = next(line for line in table.splitlines() if "sub-linear" in line)
    assert "IVF8,Flat: 1.20" in exponents and "dense" not in exponents.split("|")[2]


def test_unknown_index_label_is_refused(runner, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["run_experiments.py", "--scale", "small", "--indices", "IVF9,Bogus"])
    with pytest.raises(SystemExit) as exit_info:
        runner.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--indices IVF9,Bogus" in err and "HNSW32" in err


def test_tagged_run_uses_its_base_scale(runner, tmp_path, monkeypatch):
    argv = ["run_experiments.py", "--scale", "tiny", "--only", "ingest", "--tag", "spot", "--threads", "1"]
    monkeypatch.setattr(runner, "run_child", lambda args: runner.read_child(args[2], int(args[3]), args[4], False))  # in-process
    monkeypatch.setattr("sys.argv", argv + ["--indices", "dense", "torch", "--lengths", "200"])
    runner.main()
    rows = _rows(tmp_path / "ingest_tiny_spot.csv")
    assert [(r["index"], r["tokens"]) for r in rows] == [("dense", "200"), ("torch", "200")]
    assert json.load(open(tmp_path / "environment_tiny_spot.json"))["ingest"]["scale"]["ingest_lengths"] == [200]
    # --append adds a point to the same file without re-running dense; without 'dense' in --indices it is skipped
    monkeypatch.setattr("sys.argv", argv + ["--indices", "IVF4,Flat", "--lengths", "300", "--append"])
    runner.main()
    rows = _rows(tmp_path / "ingest_tiny_spot.csv")
    assert [(r["index"], r["tokens"]) for r in rows] == [("dense", "200"), ("torch", "200"), ("IVF4,Flat", "300")]
    record = json.load(open(tmp_path / "environment_tiny_spot.json"))["ingest"]  # both runs' settings are kept
    assert record["scale"]["ingest_lengths"] == [300] and list(record["scale"]["indices"]) == ["IVF4,Flat"]
    assert [run["scale"]["ingest_lengths"] for run in record["earlier_runs"]] == [[200]]
    # a re-measured point keeps its place; a new one joins its label's points, ordered by size
    monkeypatch.setattr("sys.argv", argv + ["--indices", "dense", "IVF4,Flat", "--lengths", "200", "--append"])
    runner.main()
    rows = _rows(tmp_path / "ingest_tiny_spot.csv")
    assert [(r["index"], r["tokens"]) for r in rows] == [("dense", "200"), ("torch", "200"), ("IVF4,Flat", "200"),
                                                          ("IVF4,Flat", "300")]
    printed = (tmp_path / "printed_tiny_spot.txt").read_text()  # what each of the three runs printed, in order
    assert printed.count("$ python run_experiments.py --scale tiny --only ingest --tag spot") == 3
    assert printed.count("== ingest (tiny_spot)") == 3 and printed.count("== ingest done in") == 3
    assert "'index': 'IVF4,Flat', 'tokens': 300" in printed


def test_dense_max_override(runner, tmp_path, monkeypatch):
    """--dense-max lets dense memory run beyond the scale's dense_max (tiny: 200)."""
    monkeypatch.setattr(runner, "run_child", lambda args: runner.read_child(args[2], int(args[3]), args[4], False))
    argv = ["run_experiments.py", "--scale", "tiny", "--only", "ingest", "--indices", "dense sdpa", "--lengths", "300"]
    monkeypatch.setattr("sys.argv", argv)
    runner.main()
    assert not os.path.exists(tmp_path / "ingest_tiny.csv")  # 300 > dense_max: no point
    monkeypatch.setattr("sys.argv", argv + ["--dense-max", "300"])
    runner.main()
    assert [(r["index"], r["tokens"]) for r in _rows(tmp_path / "ingest_tiny.csv")] == [("dense sdpa", "300")]


def test_time_plot_keeps_a_linear_axis_for_a_zero_time(runner, tmp_path):
    """A tiny run's time can round to 0 s (a single 300-token point: nothing positive to log-scale); the log-scaled
    time plot then stays linear instead of warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.plot(str(tmp_path / "t"), {"dense sdpa": ([300], [0.0])}, "tokens", "s", "t", logy=True)
        runner.plot(str(tmp_path / "u"), {"dense": ([256, 512], [0.001, 0.004])}, "tokens", "s", "u", logy=True)
    assert (tmp_path / "t.png").stat().st_size > 0 and (tmp_path / "u.png").stat().st_size > 0


def test_passkey_failure_analysis_window_rule():
    spec = importlib.util.spec_from_file_location("passkey_failures",
                                                  os.path.join(ROOT, "experiments", "passkey_failures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    whole = module.copy_is_whole  # (start, length, num_tokens, window, last_context)
    assert whole(10, 5, 1000, 64, 32)  # tokens 9..14 in window 0
    assert not whole(60, 5, 1000, 64, 32)  # tokens 59..64 cross into window 1
    assert not whole(64, 5, 1000, 64, 32)  # the token before the key is in the previous window
    assert whole(65, 5, 1000, 64, 32)
    assert whole(980, 5, 1000, 64, 32)  # inside the final local context (tokens 968..999)
    assert not whole(966, 5, 1000, 64, 32)  # 965..970: prefix window / local context boundary at 968
    span = module.span_in_one_window  # (first, last, num_tokens, window, last_context)
    assert span(0, 63, 1000, 64, 32) and not span(0, 64, 1000, 64, 32)
    assert span(968, 999, 1000, 64, 32) and not span(960, 970, 1000, 64, 32)


def test_passkey_failure_analysis_of_recorded_trials(tmp_path, monkeypatch):
    """--recorded: rebuilds each recorded trial's prompt (refusing a record whose key is not the prompt's) and finds
    its key line's tokens; checked by decoding them, independently of the offsets the script uses."""
    from knn_longllama.demo import load_demo
    from knn_longllama.passkey import INFO_TEMPLATE, n_garbage_for_tokens, passkey_prompts

    spec = importlib.util.spec_from_file_location("passkey_failures",
                                                  os.path.join(ROOT, "experiments", "passkey_failures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", str(tmp_path))
    _, tokenizer = load_demo()
    prompts = list(passkey_prompts(n_garbage_for_tokens(tokenizer, 1024), 2, seed=3))
    header = "index,k,tokens,seed,trial,key,depth,correct,generated\n"
    (tmp_path / "passkey_trials_t_a.csv").write_text(header + "".join(
        f'"IVF8,Flat",32,1024,3,{trial},{key},0.5,{trial},{key}\n' for trial, (_, key) in enumerate(prompts)))
    rows = module.recorded_rows(tokenizer, "t", 256, 128)
    assert [(r["trial"], r["key"], r["correct"]) for r in rows] == [("0", prompts[0][1], 0), ("1", prompts[1][1], 1)]
    for r, (prompt, key) in zip(rows, prompts):
        ids = tokenizer(prompt).input_ids
        line = INFO_TEMPLATE.format(key=key)
        first = r["line_start"]
        last = next(j for j in range(first, len(ids)) if line in tokenizer.decode(ids[first:j + 1]))
        assert line not in tokenizer.decode(ids[first + 1:last + 1])  # the line starts at `first`, ends at `last`
        local = first >= len(ids) - 128
        assert r["window_position"] == ("local" if local else first % 256)
        assert r["line_whole"] == int(local or first // 256 == last // 256 and last < len(ids) - 128)
    table = module.recorded_table(rows + [dict(rows[0], window_position=p, line_whole=w, correct=c)
                                          for p, w, c in [(63, 1, 1), (64, 1, 0), (255, 0, 1)]], "t", 256)
    positions = [r["window_position"] for r in rows]
    expected = {q: [0, 0] for q in ("0-63", "64-127", "128-191", "192-255", "local")}
    for p, c in zip(positions + [63, 64, 255], [r["correct"] for r in rows] + [1, 0, 1]):
        cell = expected["local" if p == "local" else ("0-63", "64-127", "128-191", "192-255")[p // 64]]
        cell[0], cell[1] = cell[0] + c, cell[1] + 1
    cut = [r for r in rows if not r["line_whole"]] + [{"correct": 1}]
    cells = [f"{c}/{t}" if t else "-" for c, t in expected.values()] + [f"{sum(r['correct'] for r in cut)}/{len(cut)}"]
    assert f"| IVF8,Flat | 32 | 1024 | {' | '.join(cells)} |" in table
    (tmp_path / "passkey_trials_t_b.csv").write_text(header + '"IVF8,Flat",32,1024,3,0,12,0.5,1,12\n')
    with pytest.raises(ValueError, match="key 12 is not the prompt's"):
        module.recorded_rows(tokenizer, "t", 256, 128)
    with pytest.raises(ValueError, match="--recorded 'nothing'"):
        module.recorded_rows(tokenizer, "nothing", 256, 128)


def test_child_peak_rss_is_its_own(runner):
    """A child reports its own peak memory, not its parent's (ru_maxrss survives fork + exec on Linux)."""
    import subprocess
    import sys

    if not os.path.exists("/proc/self/status"):
        pytest.skip("VmHWM needs Linux /proc")
    ballast = bytearray(1 << 30)  # the parent holds 1 GiB, touched
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('r', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.peak_rss_mb())")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "experiments", "run_experiments.py")],
                         capture_output=True, text=True, check=True).stdout
    assert 10 < float(out.strip().splitlines()[-1]) < 900
    assert runner.peak_rss_mb() >= 1024  # this process: at least the ballast
    del ballast


def test_recall_keys_are_those_the_last_window_searches(runner):
    """Ground truth is searched among the entries the recorded queries saw: not their own window's keys."""
    scale = runner.SCALES["tiny"]
    model, tokenizer = runner.load(memory_spec="dense", mem_dtype="float32")
    from knn_longllama.passkey import n_garbage_for_tokens, passkey_prompts

    texts = runner.recall_texts(scale, tokenizer)
    assert set(texts) == {"austen", "passkey"}
    (first, _), = passkey_prompts(n_garbage_for_tokens(tokenizer, scale.recall_tokens), 1, seed=0)
    assert texts["passkey"] == tokenizer(first)["input_ids"]  # the passkey experiment's first trial
    assert len(texts["austen"]) == scale.recall_tokens and abs(len(texts["passkey"]) - scale.recall_tokens) < 20
    window = model.config.max_position_embeddings
    ids = texts["passkey"]
    layer = min(model.config.mem_layers)
    queries, keys = runner.real_keys_and_queries(model, ids, layer)
    heads, dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    assert keys.shape == (1, heads, len(ids) - window, dim)
    assert queries.shape == (1, heads, window, dim)

    # Reference: the whole model reads the text with dense memory in every memory layer (the official reading);
    # the first memory layer's memory is asked by the last window's queries and holds the earlier windows' keys.
    class Spy:
        def __init__(self, inner):
            self.inner, self.asked = inner, []

        def add(self, *args):
            self.inner.add(*args)

        def lookup(self, q, h0, h1):
            self.asked.append(q.clone())
            return self.inner.lookup(q, h0, h1)

    memories = {idx: model.model.new_memory(1, model.device) for idx in model.config.mem_layers}
    model.model.write_memory(torch.tensor([ids[:-window]]), memories)
    dense_keys = memories[layer].keys.view().clone()
    memories[layer] = Spy(memories[layer])
    model.model.write_memory(torch.tensor([ids[-window:]]), memories)
    torch.testing.assert_close(keys, dense_keys, rtol=0, atol=0)
    torch.testing.assert_close(queries, memories[layer].asked[-1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="first memory layer"):
        runner.real_keys_and_queries(model, ids, max(model.config.mem_layers))


def test_goals_read_tagged_runs(readme, tmp_path):
    """A base scale's goals include its tagged runs (`--tag 1m_s3` writes passkey_<scale>_1m_s3.csv)."""
    header = "index,k,tokens,prompt_tokens,search,accuracy,trials,seconds\n"
    (tmp_path / "passkey_s_64k.csv").write_text(header + '"IVF8,Flat",32,65536,65536,approximate,1.0,5,1\n')
    (tmp_path / "passkey_s_1m_s3.csv").write_text(header + '"IVF8,Flat",32,1048576,1048576,approximate,0.5,2,1\n')
    (tmp_path / "passkey_s_1m-old.csv").write_text(header + '"IVF8,Flat",32,2097152,2097152,approximate,1.0,2,1\n')
    table = readme.goals("s")
    # the 2M-token run is not a tag ("1m-old"): the longest length is 1M
    assert "50% at 1048576 tokens (IVF8,Flat, k=32: 1 of 2 trials; 95% interval 9%-91%) | too few trials" in table
    # runs with other seeds pool their trials; the goal is judged once there are at least MIN_TRIALS of them
    (tmp_path / "passkey_s_1m_seed1.csv").write_text(header + '"IVF8,Flat",32,1048576,1048576,approximate,1.0,18,1\n')
    assert "95% at 1048576 tokens (IVF8,Flat, k=32: 19 of 20 trials; 95% interval 76%-99%) | yes |" in readme.goals("s")


def test_seed_and_ks_select_the_passkey_points(runner, tmp_path, monkeypatch):
    import knn_longllama.passkey as passkey

    seeds = []
    real = passkey.passkey_accuracy

    def spy(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(passkey, "passkey_accuracy", spy)
    monkeypatch.setattr("sys.argv", ["run_experiments.py", "--scale", "tiny", "--only", "passkey", "--indices", "torch",
                                     "--lengths", "200", "--trials", "1", "--depths", "--seed", "3", "--threads", "1"])
    runner.main()
    assert seeds == [3]
    assert json.load(open(tmp_path / "environment_tiny.json"))["passkey"]["scale"]["seed"] == 3
    assert [row["seed"] for row in _rows(tmp_path / "passkey_tiny.csv")] == ["3"]  # the goals pool by seed
    # --ks: Flat's k sweep cut to the given ks
    runner.SCALES["tiny"] = runner.replace(runner.SCALES["tiny"], indices={"Flat": ("Flat", {})}, ks=[8, 32])
    monkeypatch.setattr("sys.argv", ["run_experiments.py", "--scale", "tiny", "--only", "passkey", "--indices", "Flat",
                                     "--lengths", "200", "--trials", "1", "--depths", "--ks", "32", "--threads", "1"])
    runner.main()
    assert [(row["index"], row["k"]) for row in _rows(tmp_path / "passkey_tiny.csv")] == [("Flat", "32")]


def test_recall_summary_keeps_each_index_settings_and_folds_the_sweeps(readme, tmp_path, monkeypatch):
    header = "text,index,faiss_metric,param,value,k,recall_at_k,attention_mass_kept,search_ms,mass_of_exact_topk\n"
    (tmp_path / "recall_s.csv").write_text(header +
        'a,Flat,ip,{},-,8,1.0,0.2,40.0,0.2\n'
        'a,"IVF8,Flat",l2,"{""nprobe"": 2, ""faiss_metric"": ""l2""}",-,8,0.5,0.1,4.0,0.2\n'
        'a,"IVF8,Flat",l2,nprobe,1,8,0.25,0.05,2.0,0.2\n'  # a sweep row: folded, not summarised
        'b,"IVF8,Flat",l2,"{""nprobe"": 2, ""faiss_metric"": ""l2""}",-,8,0.75,0.3,6.0,0.4\n')
    table = readme.recall_summary("s")
    assert "| index | settings | k | a recall | a kept | a ms | b recall | b kept | b ms |" in table
    assert "| Flat | ip | 8 | 1.00 | 1.00 | 40 | - | - | - |" in table
    assert "| IVF8,Flat | l2, nprobe 2 | 8 | 0.50 | 0.50 | 4 | 0.75 | 0.75 | 6 |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 3  # header + 2 settings
    assert readme.recall_summary("t") == ""
    (tmp_path / "recall_s.md").write_text("**measured on 9 keys**\n\n| every recall row |\n")
    (tmp_path / "environment_s.json").write_text(json.dumps({"recall": {}}))
    monkeypatch.setattr(readme, "current_model", lambda: {"weights_sha256": "aaaa", "window": 256})
    text = readme.section()
    assert (text.index("measured on 9 keys") < text.index("At each index's own settings") < text.index("<details>")
            < text.index("every recall row"))


def test_tables_order_k_as_numbers(readme, tmp_path):
    header = "index,k,tokens,prompt_tokens,search,accuracy,trials,seed,seconds\n"
    (tmp_path / "passkey_s.csv").write_text(header + "".join(f"Flat,{k},4096,4096,exact,1.0,5,0,1\n"
                                                             for k in (128, 8, 32)))
    (tmp_path / "passkey_s_x.csv").write_text(header + "dense,-,4096,4096,dense,1.0,5,0,1\n")
    table = readme.pooled_passkey("s")
    rows = [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| Flat") or
            line.startswith("| dense")]
    assert rows == ["-", "8", "32", "128"]


def test_wilson_interval_matches_published_values(readme):
    """95% Wilson score intervals as tabulated (Newcombe 1998, Table I: 81/263; and 0/10, 10/10, 7/10)."""
    for (correct, trials), expected in {(81, 263): (0.2553, 0.3662), (0, 10): (0.0, 0.2775),
                                        (10, 10): (0.7225, 1.0), (7, 10): (0.3968, 0.8922)}.items():
        assert readme.wilson_interval(correct, trials) == pytest.approx(expected, abs=1e-4)


def test_ingest_exponent_goal_names_each_index_and_its_lengths(readme, tmp_path):
    header = "index,tokens,search,seconds,us_per_token,peak_rss_mb,memory_mb,time_exponent\n"
    (tmp_path / "ingest_s.csv").write_text(header + '"IVF8,Flat",1000,exact,1,1,1,1,1.2\n'
                                           '"IVF8,Flat",16000,approximate,16,1,1,1,1.2\n')
    row = next(line for line in readme.goals("s").splitlines() if "sub-linear" in line)
    assert row.endswith("| IVF8,Flat: 1.20 (1000-16000 tokens) | yes |")
    (tmp_path / "ingest_s.csv").write_text(header + '"IVF8,Flat",1000,exact,1,1,1,1,1.2\n'
                                           '"IVF8,Flat",16000,approximate,16,1,1,1,1.2\n'
                                           '"IVF8,PQ4",1000,exact,1,1,1,1,2.1\n"IVF8,PQ4",4000,exact,1,1,1,1,2.1\n')
    row = next(line for line in readme.goals("s").splitlines() if "sub-linear" in line)
    assert row.endswith("| IVF8,Flat: 1.20 (1000-16000 tokens), IVF8,PQ4: 2.10 (1000-4000 tokens) | "
                        "with IVF8,Flat; not with IVF8,PQ4 |")
    (tmp_path / "ingest_s.csv").write_text(header + '"IVF8,PQ4",1000,exact,1,1,1,1,2.1\n')
    assert next(line for line in readme.goals("s").splitlines() if "sub-linear" in line).endswith("| no |")


def test_ivf_scan_benchmark_compares_the_same_searches(tmp_path, monkeypatch):
    """bench_ivf_scan.py at a tiny size: both methods time the same IVF search (Faiss's query-batched scan returns
    the plain search's neighbours) and the table, CSV and plot are written."""
    spec = importlib.util.spec_from_file_location("bench_ivf_scan",
                                                  os.path.join(ROOT, "experiments", "bench_ivf_scan.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    module.main(["--keys", "3000", "--nlist", "16", "--nprobes", "2", "16", "--queries", "20", "--repeats", "1",
                 "--d", "8", "--k", "5"])
    rows = _rows(tmp_path / "bench_ivf_scan.csv")
    assert [(r["nprobe"], r["method"]) for r in rows] == [(p, m) for p in ("2", "16") for m in module.METHODS]
    assert all(float(r["same_ids"]) == 1.0 for r in rows)
    assert all(float(r["vs_search"]) == 1.0 for r in rows if r["method"] == "search")
    assert (tmp_path / "bench_ivf_scan.png").stat().st_size > 0
    assert "| 3000 | 20 | 16 | big_batch |" in (tmp_path / "bench_ivf_scan.md").read_text()
    with pytest.raises(SystemExit):
        module.parse_args(["--nlist", "0"])
