"""The experiment scripts (experiments/) at a tiny scale on CPU, including the code paths of the GPU variant
(`--device`, exact top-k), and the results page they feed: every run appends rows to one table, and the page is
group-bys of it, so the scripts behind the README's numbers do not rot. Marked slow: `-m "not slow"` leaves them
out; CI runs them."""

import os
import random
import subprocess
import sys

from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments import bench_ivf_scan, bench_parallel, common, passkey_failures, update_readme
from experiments import run_experiments as runner
from knn_longllama.passkey import INFO_TEMPLATE, make_passkey_prompt, n_garbage_for_tokens, passkey_prompts

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = runner.Scale(
    name="tiny", passkey_lengths=[200], dense_max=200, trials=2,
    indices={"torch": "exact", "IVF4,Flat": "IVF4,Flat nprobe=2"},
    # recall_tokens: enough keys (1024) for IVF4 to train, so that nprobe changes what recall finds
    ks=[8], depth_length=200, depths=[0.0, 1.0], ingest_lengths=[1000], decode_sizes=[1000], recall_tokens=1600,
    recall_sweep={"IVF4,Flat": ("IVF4,Flat", "nprobe", [1, 4]),
                  "IVF4,Flat l2": ("IVF4,Flat metric=l2", "nprobe", [1, 4])})


@pytest.fixture(autouse=True)
def results(tmp_path, monkeypatch):
    """Every script and the report read and write the results table in tmp_path."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setitem(runner.SCALES, "tiny", TINY)
    return tmp_path


@pytest.fixture()
def run():
    return runner.Run("test", "env0", threads=1)


def in_process():
    """run_child without a subprocess, counting its calls."""
    calls = []

    def child(args, _run):
        calls.append(args[:4])
        return runner.read_child(args[2], args[4] == "True", int(args[3]), args[1] == "read")

    return calls, child


def test_memory_spec_per_label():
    assert runner.memory_spec("dense", TINY) == runner.memory_spec("dense sdpa", TINY) == "dense"
    assert runner.memory_spec("torch", TINY, 8) == "exact k=8"
    assert runner.memory_spec("IVF4,Flat", TINY, 8) == "IVF4,Flat k=8 nprobe=2"
    pq = runner.replace(TINY, indices={"PQ": "IVF4,PQ4x4 nprobe=2 k_factor=4 metric=l2"})
    assert runner.memory_spec("PQ", pq, 8) == "IVF4,PQ4x4 k=8 k_factor=4 metric=l2 nprobe=2"
    full = runner.SCALES["full"]  # block retrieval keeps its own k (blocks) and reads with fused SDPA
    assert runner.memory_spec("blocks 8x64 sdpa", full) == "exact k=8 block=64"
    assert runner.uses_sdpa("blocks 8x64 sdpa") and runner.uses_sdpa("dense sdpa")
    assert not runner.uses_sdpa("dense") and not runner.uses_sdpa("Flat")
    assert runner.label_k("Flat", full) == 32


def test_passkey_passes_the_memory_per_call_and_leaves_the_config(run, monkeypatch):
    import knn_longllama.passkey as passkey

    seen, real = [], passkey.passkey_accuracy

    def spy(model, tokenizer, length, **kwargs):
        seen.append((kwargs["memory_spec"], model.config.memory_spec, model.config.torch_attention))
        return real(model, tokenizer, length, **kwargs)

    monkeypatch.setattr(passkey, "passkey_accuracy", spy)
    runner.exp_passkey(runner.replace(TINY, depths=[], dense_sdpa=True, dense=False), run)
    assert seen == [("dense", "dense", True), ("exact k=32", "dense", False),
                    ("IVF4,Flat k=32 nprobe=2", "dense", False)]


def test_passkey_trials_depth_and_recall_rows(run):
    runner.exp_passkey(TINY, run)
    points, trials = common.table("passkey"), common.table("passkey_trial")
    assert set(zip(points["index"], points["k"].astype(str))) == {("dense", "-"), ("torch", "32"), ("IVF4,Flat", "32")}
    assert set(points["run"]) == {"test"} and set(points["env"]) == {"env0"} and (points["trials"] == 2).all()
    for _, p in points.iterrows():  # every point's trials, one row each, adding up to its correct count
        mine = trials[trials["index"] == p["index"]]
        assert list(mine["trial"]) == [0, 1] and mine["correct"].sum() == p["correct"]
    _, tokenizer = runner.load()
    n_garbage = n_garbage_for_tokens(tokenizer, 200)
    for _, t in trials.iterrows():  # the prompt's second line is the filler before the key line
        prompt, key = list(passkey_prompts(n_garbage, 2, t["seed"]))[t["trial"]]
        assert t["key"] == key and abs(len(prompt.split("\n")[1]) / n_garbage - t["depth"]) < 1e-4
    depth = common.table("passkey_depth")
    assert list(zip(depth["index"], depth["depth"])) == [("dense", 0.0), ("dense", 1.0), ("torch", 0.0), ("torch", 1.0)]
    prompt, _ = make_passkey_prompt(n_garbage, random.Random("depth-1.0"), depth=1.0)  # the depth sweep's prompts
    assert prompt.split("\n")[2] == INFO_TEMPLATE.format(key=random.Random("depth-1.0").randrange(1, 50000))
    assert len(prompt.split("\n")[1]) == n_garbage and prompt.split("\n")[3] == ""

    runner.exp_recall(TINY, run)
    recall = common.table("recall")
    assert set(recall["index"]) == {"IVF4,Flat", "IVF4,Flat sweep", "IVF4,Flat l2 sweep"}  # exact top-k: no row
    assert set(zip(recall["text"], recall["k"])) == {("austen", 8), ("passkey", 32)}  # passkey: its k only
    assert (recall["attention_mass_kept"] <= recall["mass_of_exact_topk"] + 1e-4).all()
    full_probe = recall[recall["sweep_value"] == 4]  # nprobe = nlist: exact search
    assert set(full_probe["memory_spec"].str.contains("metric=l2")) == {True, False}
    assert (full_probe["attention_mass_kept"] == full_probe["mass_of_exact_topk"]).all()
    # l2 ranks by |q|^2 + |k'|^2 - 2 q.k' in float32: a near-tie at the k-th place may swap, which changes no mass
    assert (full_probe["recall_at_k"] >= 0.999).all()


def test_children_on_cpu():
    n = 1000  # > window (256) + last_context_length (128): whole windows go to memory
    dense = runner.read_child("dense", False, n, decode=False)
    knn = runner.read_child("IVF4,Flat k=32 nprobe=2", False, n, decode=True)
    assert set(dense) == {"ingest"} and dense["ingest"]["search"] == "dense"
    for row in (dense["ingest"], knn["ingest"]):
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 0 and row["memory_mb"] > 0
    assert knn["decode"]["ms_per_token"] > 0 and abs(knn["decode"]["read_seconds"] - knn["ingest"]["seconds"]) <= 0.0051


def test_ingest_and_decode_share_each_read(run, monkeypatch):
    calls, child = in_process()
    monkeypatch.setattr(runner, "run_child", child)
    runner.exp_ingest(TINY, run)
    runner.exp_decode(TINY, run)
    assert calls == [["--child", "read", "exact k=32", "1000"], ["--child", "read", "IVF4,Flat k=32 nprobe=2", "1000"]]
    ingest, decode = common.table("ingest"), common.table("decode")
    assert list(zip(ingest["index"], ingest["tokens"])) == [("torch", 1000), ("IVF4,Flat", 1000)]  # dense > dense_max
    assert (abs(decode["read_seconds"] - ingest["seconds"]) <= 0.0051).all()  # the same read, rounded to 2 places


def test_ingest_times_both_dense_variants(run, monkeypatch):
    monkeypatch.setattr(runner, "run_child", in_process()[1])
    runner.exp_ingest(runner.replace(TINY, dense_max=1000, dense_sdpa=True, indices={}, decode_sizes=[]), run)
    rows = common.table("ingest")
    assert list(zip(rows["index"], rows["search"])) == [("dense", "dense"), ("dense sdpa", "dense")]
    assert rows["memory_mb"].nunique() == 1


def test_flat_k_sweep_stops_at_its_length(run):
    scale = runner.replace(TINY, passkey_lengths=[150, 300], dense_max=300, trials=1, depths=[],
                           indices={"Flat": "Flat"}, ks=[8, 32], k_sweep_max=150)
    runner.exp_passkey(scale, run)
    points = common.table("passkey")
    assert set(zip(points["index"], points["k"].astype(str), points["tokens"])) == {
        ("dense", "-", 150), ("dense", "-", 300), ("Flat", "8", 150), ("Flat", "32", 150), ("Flat", "32", 300)}


def test_main_records_run_seed_and_overrides(monkeypatch):
    import knn_longllama.passkey as passkey

    seeds, real = [], passkey.passkey_accuracy
    monkeypatch.setattr(passkey, "passkey_accuracy", lambda *a, **kw: (seeds.append(kw["seed"]), real(*a, **kw))[1])
    runner.main(["--scale", "tiny", "--only", "passkey", "--indices", "torch", "--lengths", "200", "--trials", "1",
                 "--depths", "--seed", "3", "--threads", "1", "--run", "spot"])
    points = common.table("passkey")
    assert seeds == [3] and list(points["seed"]) == [3] and list(points["run"]) == ["spot"]
    envs = common.environments()
    assert list(envs["env"]) == list(points["env"])
    assert envs["weights_sha256"][0] == common.model_identity()["weights_sha256"]
    assert common.environment("cpu", 1) == points["env"][0] and len(common.environments()) == 1  # recorded once


def test_main_refuses_bad_arguments(capsys):
    for argv, message in ((["--indices", "IVF9,Bogus"], "--indices IVF9,Bogus"),
                          (["--device", "cuda"], "--device cuda")):
        if argv[0] == "--device" and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit) as exit_info:
            runner.main(["--scale", "small", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_dense_max_override(monkeypatch, run):
    monkeypatch.setattr(runner, "run_child", in_process()[1])
    argv = ["--scale", "tiny", "--only", "ingest", "--indices", "dense sdpa", "--lengths", "300", "--threads", "1"]
    runner.main(argv)
    assert common.table("ingest").empty  # 300 > dense_max: no point
    runner.main(argv + ["--dense-max", "300"])
    assert list(common.table("ingest")["index"]) == ["dense sdpa"]


def test_search_mode_follows_the_training_size():
    """Trainable indices search exactly until a store holds default_train_size keys (40 per centroid of the largest
    codebook, at least 1024); the runner labels every point with the search that produced it."""
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=128, num_attention_heads=4, last_context_length=128)
    mode = lambda spec, n: runner.search_mode(spec, config, n)  # noqa: E731
    assert [mode(spec, 10**6) for spec in ("dense", "exact", "Flat", "HNSW8")] == ["dense", "exact", "exact",
                                                                                   "approximate"]
    assert mode("IVF64,Flat", 128 + 40 * 64 - 1) == "exact" and mode("IVF64,Flat", 128 + 40 * 64) == "approximate"
    assert mode("IVF16,PQ4", 128 + 40 * 256 - 1) == "exact" and mode("IVF16,PQ4", 128 + 40 * 256) == "approximate"


def test_recall_keys_are_those_the_last_window_searches():
    """Ground truth is searched among the entries the recorded queries saw: not their own window's keys."""
    model, tokenizer = runner.load(mem_dtype="float32")
    texts = runner.recall_texts(TINY, tokenizer)
    (first, _), = passkey_prompts(n_garbage_for_tokens(tokenizer, TINY.recall_tokens), 1, seed=0)
    assert texts["passkey"] == tokenizer(first)["input_ids"] and len(texts["austen"]) == TINY.recall_tokens
    window, ids, layer = model.config.max_position_embeddings, texts["passkey"], min(model.config.mem_layers)
    queries, keys = runner.real_keys_and_queries(model, ids, layer)
    assert keys.shape[2] == len(ids) - window and queries.shape[2] == window

    class Spy:  # the whole model reads with dense memory in every memory layer (the official reading)
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


def test_child_peak_rss_is_its_own():
    """A child reports its own peak memory, not its parent's (ru_maxrss survives fork + exec on Linux)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("VmHWM needs Linux /proc")
    ballast = bytearray(1 << 30)  # the parent holds 1 GiB, touched
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    out = subprocess.run([sys.executable, "-c", "from experiments import common; print(common.rss_mb())"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert 10 < float(out) < 900 and common.rss_mb() >= 1024


def test_ivf_scan_benchmark_compares_the_same_searches():
    """Every method times the same IVF search: Faiss's query-batched scan and the store's torch coarse step +
    search_preassigned return the plain search's neighbours."""
    bench_ivf_scan.main(["--keys", "3000", "--nlist", "16", "--nprobes", "2", "16", "--queries", "20", "--seconds",
                         "0.01", "--d", "8", "--k", "5"])
    rows = common.table("bench_ivf_scan")
    assert list(zip(rows["nprobe"], rows["method"])) == [(p, m) for p in (2, 16)
                                                         for m in ("search", "big_batch", "torch_coarse")]
    assert (rows["same_ids"] == 1.0).all() and (rows["ms"] > 0).all()
    with pytest.raises(SystemExit):
        bench_ivf_scan.parse_args(["--nlist", "0"])


def test_parallel_benchmark_rows_and_section(results):
    """One process, then 2 ranks per layout, read the same tokens: the ranks hold every key between them, exact Flat
    keeps recall 1 through the merge, and the results page renders the rows."""
    bench_parallel.main(["--tokens", "1500", "--memory", "Flat k=8", "--run", "t"])
    bench_parallel.main(["--tokens", "1500", "--memory", "dense", "--layouts", "contiguous", "--run", "t"])
    rows = common.table("bench_parallel")
    for spec, layouts in (("Flat k=8", ["round robin", "contiguous"]), ("dense", ["contiguous"])):
        part = rows[rows["memory_spec"] == spec]
        assert list(dict.fromkeys(part["layout"])) == ["one process", *layouts]
        summary, ranks = part[part["rank"] == "all"], part[part["rank"] != "all"]
        assert (summary["seconds"] > 0).all() and list(summary["x_one_process"])[0] == 1.0
        whole = int(ranks[ranks["layout"] == "one process"]["keys"].iloc[0])
        assert whole == 1280  # 5 whole windows of 256; the last 220 tokens stay pending
        for layout in layouts:  # 3 windows on rank 0 (0, 2, 4 or 0, 1, 2) and 2 on rank 1
            shard = ranks[ranks["layout"] == layout]
            held = [768, 512]
            assert list(shard["keys"]) == held and (shard["sent_mb"] > 0).all() and (shard["collective_s"] > 0).all()
        if spec == "Flat k=8":
            assert (summary["recall"] == 1.0).all()
    assert bench_parallel.tie_aware_recall(torch.tensor([[3.0, 2.0, 2.0]]), torch.tensor([[3.0, 2.0, 1.0]])) == 1.0
    assert bench_parallel.tie_aware_recall(torch.tensor([[3.0, -float("inf")]]), torch.tensor([[3.0, 2.0]])) == 0.5
    section = "\n".join(update_readme.parallel_section())
    assert "| 1500 | Flat k=8 | round robin | 2 |" in section and (results / "bench_parallel.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        bench_parallel.parse_args(["--ranks", "1"])


def test_passkey_failure_window_rule():
    whole = passkey_failures.copy_is_whole  # (start, length, num_tokens, window, last_context)
    assert whole(10, 5, 1000, 64, 32) and not whole(60, 5, 1000, 64, 32)  # tokens 59..64 cross into window 1
    assert not whole(64, 5, 1000, 64, 32) and whole(65, 5, 1000, 64, 32)  # the token before the key counts
    assert whole(980, 5, 1000, 64, 32) and not whole(966, 5, 1000, 64, 32)  # the final local context starts at 968
    span = passkey_failures.span_in_one_window  # (first, last, num_tokens, window, last_context)
    assert span(0, 63, 1000, 64, 32) and not span(0, 64, 1000, 64, 32)
    assert span(968, 999, 1000, 64, 32) and not span(960, 970, 1000, 64, 32)


def test_passkey_failure_analysis_of_recorded_trials():
    """--recorded: rebuilds each recorded trial's prompt (refusing a record whose key is not the prompt's) and finds
    its key line's tokens; checked by decoding them, independently of the offsets the script uses."""
    from knn_longllama.demo import load_demo

    _, tokenizer = load_demo()
    prompts = list(passkey_prompts(n_garbage_for_tokens(tokenizer, 1024), 2, seed=3))
    trials = [dict(scale="t", index="IVF8,Flat", k=32, tokens=1024, seed=3, trial=i, key=key, depth=0.5, correct=i,
                   generated=key) for i, (_, key) in enumerate(prompts)]
    common.append_rows("passkey_trial", trials, ["key", "depth", "correct", "generated"], "a", "e")
    rows = passkey_failures.recorded_rows(tokenizer, "t", 256, 128)
    assert [(r["trial"], r["key"], r["correct"]) for r in rows] == [(0, prompts[0][1], 0), (1, prompts[1][1], 1)]
    for r, (prompt, key) in zip(rows, prompts):
        ids, line, first = tokenizer(prompt).input_ids, INFO_TEMPLATE.format(key=key), r["line_start"]
        last = next(j for j in range(first, len(ids)) if line in tokenizer.decode(ids[first:j + 1]))
        assert line not in tokenizer.decode(ids[first + 1:last + 1])  # the line starts at `first`, ends at `last`
        local = first >= len(ids) - 128
        assert r["window_position"] == ("local" if local else first % 256)
        assert r["line_whole"] == int(local or first // 256 == last // 256 and last < len(ids) - 128)
    common.append_rows("passkey_trial", [dict(trials[0], trial=0, key=12)], ["key"], "b", "e")  # a later run's record
    with pytest.raises(ValueError, match="key 12 is not the prompt's"):
        passkey_failures.recorded_rows(tokenizer, "t", 256, 128)
    with pytest.raises(ValueError, match="--recorded 'nothing'"):
        passkey_failures.recorded_rows(tokenizer, "nothing", 256, 128)


# -- the results page: group-bys of the table ------------------------------------------------------------------------
def passkey(rows: list[tuple], run="r", scale="s", env="e"):
    """Passkey points (index, k, tokens, search, correct, trials, seed) of one run."""
    keys = ["index", "k", "tokens", "search", "correct", "trials", "seed"]
    common.append_rows("passkey", [dict(zip(keys, r), scale=scale, memory_spec="x") for r in rows],
                       ["correct", "trials"], run, env)


def knn_goal(scale="s") -> str:
    return next(line for line in update_readme.goals(scale).splitlines() if "wherever dense runs" in line)


def test_goals_pool_seeds_and_compare_knn_with_dense_on_the_same_prompts():
    passkey([("dense", "-", 4096, "dense", 5, 5, 1), ("IVF8,Flat", 32, 4096, "approximate", 3, 5, 1)], run="a")
    passkey([("IVF8,Flat", 32, 4096, "approximate", 5, 5, 0)], run="b")  # seed 0: no dense run to compare with
    passkey([("dense", "-", 4096, "dense", 4, 5, 2), ("IVF8,Flat", 32, 4096, "approximate", 5, 5, 2),
             ("IVF8,Flat", 32, 16384, "approximate", 5, 5, 2)], run="c")
    # seeds 1 and 2: 3 + 5 kNN vs 5 + 4 dense of 10; seed 0 (kNN only) and 16384 (no dense) are left out
    assert "below dense: IVF8,Flat k=32 at 4096 (8 vs 9 of 10); 10 trials a point" in knn_goal()
    assert knn_goal().endswith("| no |")
    passkey([("dense", "-", 4096, "dense", 3, 5, 0)], run="d")
    assert "| everywhere; 15 trials a point" in knn_goal() and knn_goal().endswith("| yes |")  # 13 vs 12 of 15
    passkey([("dense", "-", 4096, "dense", 2, 5, 0)], run="e")  # a point measured again counts once: its last run
    assert "| everywhere; 15 trials a point" in knn_goal()  # 13 vs 11 of 15
    table = update_readme.markdown(update_readme.pooled(update_readme.passkey_points("s")))
    assert "| dense | - | 4096 | dense | 11 | 15 | 0, 1, 2 |" in table
    assert "| IVF8,Flat | 32 | 4096 | approximate | 13 | 15 | 0, 1, 2 |" in table


def test_knn_is_compared_with_dense_trial_by_trial_where_trial_counts_differ():
    passkey([("dense sdpa", "-", 8192, "dense", 3, 4, 1)], run="a")
    passkey([("IVF8,Flat", 32, 8192, "approximate", 3, 5, 1), ("Flat", 32, 8192, "exact", 5, 5, 1)], run="b")
    keys = ["index", "k", "tokens", "seed", "trial", "correct"]
    trials = [("dense sdpa", "-", 8192, 1, t, c) for t, c in enumerate([1, 0, 1, 1])]
    trials += [("IVF8,Flat", 32, 8192, 1, t, c) for t, c in enumerate([1, 1, 0, 0, 1])]
    common.append_rows("passkey_trial", [dict(zip(keys, t), scale="s") for t in trials], ["correct"], "a", "e")
    # trials 0-3: IVF 2 of 4, dense 3 of 4; Flat (no trial records) is not compared
    assert "below dense: IVF8,Flat k=32 at 8192 (2 vs 3 of 4); 4 trials a point" in knn_goal()
    assert "Flat k=32 at" not in knn_goal().replace("IVF8,Flat k=32 at", "")


def test_official_dense_wins_and_settings_meeting_the_goal_are_named():
    passkey([("dense sdpa", "-", 4096, "dense", 5, 5, 1), ("dense", "-", 4096, "dense", 5, 5, 1),
             ("dense", "-", 16384, "dense", 5, 5, 1), ("IVF8,Flat", 32, 4096, "approximate", 4, 5, 1),
             ("IVF8,Flat np8", 32, 4096, "approximate", 5, 5, 1), ("IVF8,Flat np8", 32, 16384, "approximate", 5, 5, 1),
             ("Flat", 32, 4096, "exact", 5, 5, 1), ("Flat", 32, 16384, "exact", 4, 5, 1)])
    assert "below dense: IVF8,Flat k=32 at 4096 (4 vs 5 of 5), Flat k=32 at 16384 (4 vs 5 of 5)" in knn_goal()
    assert knn_goal().endswith("| with IVF8,Flat np8 k=32; not with Flat k=32, IVF8,Flat k=32 |")
    table = update_readme.markdown(update_readme.pooled(update_readme.passkey_points("s")))
    assert [line.split(" | ")[0] for line in table.splitlines() if "| 4096 |" in line] == [
        "| dense", "| dense sdpa", "| Flat", "| IVF8,Flat", "| IVF8,Flat np8"]  # dense first, then by name and k


def test_passkey_goal_at_1m_pools_seeds_until_enough_trials():
    passkey([("IVF8,Flat", 32, 65536, "approximate", 5, 5, 1)], run="a")
    passkey([("IVF8,Flat", 32, 1048576, "approximate", 1, 2, 1)], run="b")
    goal = update_readme.goals("s")
    assert "50% at 1048576 tokens (IVF8,Flat, k=32: 1 of 2 trials; 95% interval 9%-91%) | too few trials" in goal
    passkey([("IVF8,Flat", 32, 1048576, "approximate", 18, 18, 2)], run="c")
    assert "95% at 1048576 tokens (IVF8,Flat, k=32: 19 of 20 trials; 95% interval 76%-99%) | yes |" in (
        update_readme.goals("s"))


def test_ingest_and_decode_goals():
    keys = ["index", "tokens", "seconds"]
    rows = [("dense", 1000, 2), ("dense", 4000, 32), ("dense sdpa", 1000, 1), ("dense sdpa", 4000, 12),
            ("IVF8,Flat", 1000, 1), ("IVF8,Flat", 4000, 4), ("IVF8,Flat", 16000, 16), ("IVF8,PQ4", 1000, 1),
            ("IVF8,PQ4", 4000, 18.4)]
    common.append_rows("ingest", [dict(zip(keys, r), scale="s") for r in rows], ["seconds"], "r", "e")
    goals = update_readme.goals("s")
    # against the faster dense: 12 / 4 = 3x at 4000; at 16000 dense would take 12 * 4^2 = 192 s against IVF's 16 s
    assert ("3.0x at 4000 tokens (largest length dense ran; against dense sdpa, the faster of dense and dense sdpa)"
            in goals)
    assert "at 16000 tokens IVF8,Flat took 16 s, dense extrapolated quadratically ~192 s, so ~12x" in goals
    assert "| IVF8,Flat: 1.00 (1000-16000 tokens), IVF8,PQ4: 2.10 (1000-4000 tokens) | with IVF8,Flat; not with " \
           "IVF8,PQ4 |" in goals
    keys = ["index", "tokens", "ms_per_token"]
    common.append_rows("decode", [dict(zip(keys, r), scale="s") for r in [("IVF8,Flat", 1024, 10.0),
                                                                          ("IVF8,Flat", 1048576, 15.0)]],
                       ["ms_per_token"], "r", "e")
    assert "| at 1048576 vs 1024 tokens: IVF8,Flat 1.50x | yes |" in update_readme.goals("s")


def test_wilson_interval_matches_published_values():
    """95% Wilson score intervals as tabulated (Newcombe 1998, Table I: 81/263; and 0/10, 10/10, 7/10)."""
    for (correct, trials), expected in {(81, 263): (0.2553, 0.3662), (0, 10): (0.0, 0.2775),
                                        (10, 10): (0.7225, 1.0), (7, 10): (0.3968, 0.8922)}.items():
        assert update_readme.wilson_interval(correct, trials) == pytest.approx(expected, abs=1e-4)


def test_depth_table_bins_every_recorded_trial():
    keys = ["index", "k", "tokens", "seed", "trial", "depth", "correct"]
    rows = [("Flat", 32, 4096, 0, 0, 0.0, 1), ("Flat", 32, 4096, 0, 1, 0.19, 0), ("Flat", 32, 4096, 0, 2, 1.0, 1),
            ("Flat", 32, 4096, 1, 0, 0.2, 1), ("dense", "-", 4096, 1, 0, 0.5, 1)]
    common.append_rows("passkey_trial", [dict(zip(keys, r), scale="s") for r in rows], ["depth", "correct"], "r", "e")
    table = update_readme.depth_of_recorded_trials("s")
    assert "| Flat | 32 | 4096 | 1/2 | 1/1 | - | - | 1/1 |" in table  # depth 1.0 falls in the last bin
    assert "| dense | - | 4096 | - | - | 1/1 | - | - |" in table and update_readme.depth_of_recorded_trials("t") == ""


def test_update_readme_writes_the_page_plots_and_a_short_headline(results):
    env = common.environment()
    passkey([("dense", "-", 4096, "dense", 5, 5, 1), ("dense sdpa", "-", 16384, "dense", 5, 5, 1),
             ("Flat", 32, 4096, "exact", 5, 5, 1), ("HNSW8", 32, 4096, "approximate", 1, 5, 1),
             ("IVF8,Flat", 32, 4096, "approximate", 4, 5, 1), ("IVF8,Flat", 32, 16384, "approximate", 5, 5, 1)],
            scale="small", env=env)
    readme_path, page_path = results / "README.md", results / "page.md"
    readme_path.write_text(f"intro\n{update_readme.BEGIN}\nold results\n{update_readme.END}\noutro\n")
    update_readme.main(str(readme_path), str(page_path))
    page, new = page_path.read_text(), readme_path.read_text()
    assert page.startswith("# Experiment results\n") and "![passkey_small](results/passkey_small.png)" in page
    assert (results / "passkey_small.png").stat().st_size > 0 and "(the shipped one)" in page
    assert new.startswith(f"intro\n{update_readme.BEGIN}\n") and new.endswith(f"{update_readme.END}\noutro\n")
    block = new[new.index(update_readme.BEGIN):new.index(update_readme.END)]
    assert "old results" not in block and ".png" not in block and "[experiments/README.md]" in block
    # dense (fused where only it ran), exact Flat k=32, and the kNN settings run at several lengths (not HNSW8)
    assert [line for line in block.splitlines() if line.startswith("| ")] == [
        "| tokens | dense | Flat k=32 | IVF8,Flat k=32 |", "| 4096 | 5/5 (57%-100%) | 5/5 (57%-100%) | 4/5 (38%-96%) |",
        "| 16384 | 5/5 (57%-100%) sdpa | - | 5/5 (57%-100%) |"]
    common.append_rows("passkey", [dict(scale="small", index="Flat", k=32, tokens=8192, seed=0, search="exact",
                                        correct=1, trials=1)], ["correct", "trials"], "old", "other")
    envs = common.environments()
    pd.concat([envs, envs.assign(env="other", weights_sha256="bbbb")]).to_csv(results / "environments.csv", index=False)
    line = update_readme.model_line("small")
    assert "another demo checkpoint" in line and "`bbbb`" in line
    readme_path.write_text("no markers\n")
    with pytest.raises(SystemExit):
        update_readme.main(str(readme_path), str(page_path))


def test_results_page_and_headline_are_regenerated_from_the_table(monkeypatch):
    """The committed results page and README headline are what the committed table gives (plots not redrawn)."""
    monkeypatch.setattr(common, "RESULTS", Path(ROOT) / "experiments" / "results")
    monkeypatch.setattr(update_readme, "plot", lambda name, panels: f"![{name}](results/{name}.png)\n")
    with open(os.path.join(ROOT, "experiments", "README.md")) as f:
        assert f.read() == update_readme.results_page(), "run `python -m experiments.update_readme`"
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert readme[readme.index(update_readme.BEGIN):readme.index(update_readme.END)] == (
        f"{update_readme.BEGIN}\n{update_readme.headline()}")
