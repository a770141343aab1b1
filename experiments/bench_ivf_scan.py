#!/usr/bin/env python
"""Does Faiss's query-batched IVF scan speed up the memory's searches?

At 1M tokens a passkey trial of the demo model spends ~90% of its time in ``IndexIVF::search``, mostly in the
per-vector distance loop over the probed lists. Faiss ships a query-batched alternative,
``faiss.contrib.big_batch_search``: it visits each inverted list once, computes the distances of all queries that
probe it with one matrix product, and merges the results. This benchmark times it against the plain
``index.search`` on the searches a memory layer makes: one (row, head) index of ``--keys`` keys augmented as
``KnnStore`` does for ``faiss_metric="l2"`` (d + 1 dimensions), ``--queries`` queries a search (a window of the
demo model: 256; of the official 3B checkpoints: 2048), k = 32, for each nprobe; side by side in one process,
medians of ``--repeats``, ratios against the plain search, and the share of the plain search's ids each method
returns (1.0: the same neighbours).

    python experiments/bench_ivf_scan.py                 # ~3 minutes on one core
    python experiments/bench_ivf_scan.py --keys 100000 --nprobes 8 32 --repeats 3   # quick look

Keys and queries are synthetic (``bench_memory.unit_data``, clustered unit vectors), so the inverted lists are
about equally full; real keys of repeated filler fill a few lists far more. Writes
experiments/results/bench_ivf_scan.{csv,md,png}.
"""

import argparse
import contextlib
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import md_table, settings_text, unit_data, write_csv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("search", "big_batch pairwise_distances", "big_batch knn_function")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=524288, help="keys in the index (default: half of 1M tokens, the "
                   "average memory a 1M-token read searches)")
    p.add_argument("--queries", type=int, nargs="+", default=[256, 2048], help="queries a search")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobes", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--d", type=int, default=32, help="head dim (the index gets d + 1)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="knn_index.set_num_threads (torch and faiss)")
    p.add_argument("--tag", default=None, help="results are written as bench_ivf_scan_<tag>.*")
    a = p.parse_args(argv)
    for name in ("keys", "nlist", "d", "k", "repeats", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(a, name)}")
    if min(a.queries) < 1 or min(a.nprobes) < 1:
        p.error("--queries and --nprobes take positive integers")
    a.dtype, a.data = "float32", "clustered"  # what settings_text reports
    return a


def search_methods(index, k: int) -> dict:
    """name -> function(queries) -> ids [Q, k], each searching `index` with its current nprobe."""
    from faiss.contrib.big_batch_search import big_batch_search

    def batched(method):
        def search(q):
            # verbose=0 still prints a line per inverted list (faiss 1.15); verbose=1 prints a few phase times,
            # swallowed here
            with contextlib.redirect_stdout(io.StringIO()):
                return big_batch_search(index, q, k, method=method, verbose=1)[1]
        return search

    return {"search": lambda q: index.search(q, k)[1], "big_batch pairwise_distances": batched("pairwise_distances"),
            "big_batch knn_function": batched("knn_function")}


def same_ids(found, reference) -> float:
    """Share of the reference's ids (row by row) that `found` returns too."""
    hits = sum(len(set(f.tolist()) & set(r.tolist())) for f, r in zip(found, reference))
    return hits / reference.size


def run(a) -> list[dict]:
    import faiss
    import numpy as np

    import knn_index
    from knn_index import factory

    knn_index.set_num_threads(a.threads)
    keys, _, _ = unit_data(a.keys, a.d, 1, seed=0)
    x = factory.augment_keys(keys.numpy(), factory.augmentation_norm(keys.numpy()))
    index = faiss.index_factory(a.d + 1, f"IVF{a.nlist},Flat")
    train = x[np.random.default_rng(0).choice(len(x), min(len(x), 40 * a.nlist), replace=False)]
    index.train(train)
    index.add(x)
    methods = search_methods(index, a.k)
    rows = []
    for Q in a.queries:
        _, _, queries = unit_data(a.keys, a.d, Q, seed=1)
        q = factory.augment_queries(queries.numpy())
        for nprobe in a.nprobes:
            index.nprobe = nprobe
            reference = methods["search"](q)
            times = {}
            for name, fn in methods.items():
                found = fn(q)  # warm-up, and the ids compared
                agreement = same_ids(found, reference)
                seconds = []
                for _ in range(a.repeats):
                    t = time.perf_counter()
                    fn(q)
                    seconds.append(time.perf_counter() - t)
                times[name] = statistics.median(seconds)
                rows.append({"queries": Q, "nprobe": nprobe, "method": name, "ms": round(times[name] * 1e3, 2),
                             "vs_search": round(times[name] / times["search"], 3), "same_ids": round(agreement, 4),
                             "repeats": a.repeats})
                print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = sorted({r["queries"] for r in rows})
    fig, axes = plt.subplots(1, len(queries), figsize=(5 * len(queries), 4), squeeze=False)
    for ax, Q in zip(axes[0], queries):
        for name in METHODS:
            sub = [r for r in rows if r["queries"] == Q and r["method"] == name]
            ax.plot([r["nprobe"] for r in sub], [r["ms"] for r in sub], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="nprobe", ylabel="ms a search (median)", title=f"{Q} queries")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    a = parse_args(argv)
    rows = run(a)
    stem = "bench_ivf_scan" + (f"_{a.tag}" if a.tag else "")
    RESULTS.mkdir(exist_ok=True)
    write_csv(RESULTS / f"{stem}.csv", rows)
    text = (f"**IVF{a.nlist},Flat search of {a.keys} keys (d = {a.d} + 1, l2-augmented), k = {a.k}: plain "
            "`index.search` against `faiss.contrib.big_batch_search`** (vs_search: time / plain search's; same_ids: "
            "share of the plain search's ids found)\n\n"
            + md_table(rows, ["queries", "nprobe", "method", "ms", "vs_search", "same_ids", "repeats"]) + "\n\n"
            + settings_text(a))
    (RESULTS / f"{stem}.md").write_text(text)
    plot(rows, RESULTS / f"{stem}.png")
    print(text)


if __name__ == "__main__":
    main()
