#!/usr/bin/env python
"""Does Faiss's query-batched IVF scan speed up the memory's searches?

At 1M tokens a passkey trial of the demo model spends ~90% of its time in ``IndexIVF::search``, mostly in the
per-vector distance loop over the probed lists. Faiss ships a query-batched alternative,
``faiss.contrib.big_batch_search`` (memory spec option ``scan=big_batch``): it visits
each inverted list once, computes the distances of all queries that probe it with one matrix product
(``pairwise_distances``; its ``knn_function`` variant was slower than the plain search everywhere we measured), and
merges the results, with a fixed Python cost per list. This benchmark times both on the searches a memory layer
makes: one (row, head) index of ``--keys`` keys augmented as ``KnnStore`` does for ``metric=l2`` (d + 1
dimensions), ``--queries`` queries a search (a window of the demo model: 256; of the official 3B checkpoints: 2048),
k = 32, for each nprobe and index size; side by side in one process, medians of ``--repeats``, the ratio of the
batched scan's time to the plain search's, and the share of the plain search's ids it returns (1.0: the same
neighbours).

    python experiments/bench_ivf_scan.py                 # ~5 minutes on one core
    python experiments/bench_ivf_scan.py --keys 100000 --nprobes 8 32 --repeats 3   # quick look

Keys and queries are synthetic (``bench_memory.unit_data``, clustered unit vectors), so the inverted lists are
about equally full; real keys of repeated filler fill a few lists far more. Writes
experiments/results/bench_ivf_scan.{csv,md,png}.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import md_table, recall, settings_text, unit_data, write_csv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("search", "big_batch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, nargs="+", default=[65536, 262144, 1048576],
                   help="index sizes (a 1M-token read searches 524288 keys on average)")
    p.add_argument("--queries", type=int, nargs="+", default=[256, 2048], help="queries a search")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobes", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--d", type=int, default=32, help="head dim (the index gets d + 1)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="knn_index.set_num_threads (torch and faiss)")
    p.add_argument("--tag", default=None, help="results are written as bench_ivf_scan_<tag>.*")
    a = p.parse_args(argv)
    for name in ("nlist", "d", "k", "repeats", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(a, name)}")
    if min(a.keys) < 1 or min(a.queries) < 1 or min(a.nprobes) < 1:
        p.error("--keys, --queries and --nprobes take positive integers")
    a.dtype, a.data = "float32", "clustered"  # what settings_text reports
    return a


def search_methods(index, k: int) -> dict:
    """name -> function(queries) -> ids [Q, k], each searching `index` with its current nprobe."""
    from knn_index import factory

    return {"search": lambda q: index.search(q, k)[1], "big_batch": lambda q: factory.big_batch_search(index, q, k)[1]}


def run(a) -> list[dict]:
    import numpy as np
    import torch

    import knn_index
    from knn_index import factory

    knn_index.set_num_threads(a.threads)
    rows = []
    for n in a.keys:
        keys, _, _ = unit_data(n, a.d, 1, seed=0)
        x = factory.augment_keys(keys.numpy(), factory.augmentation_norm(keys.numpy()))
        index = factory.make_index(f"IVF{a.nlist},Flat", a.d, "l2")
        index.train(x[np.random.default_rng(0).choice(n, min(n, 40 * a.nlist), replace=False)])
        index.add(x)
        methods = search_methods(index, a.k)
        for Q in a.queries:
            _, _, queries = unit_data(n, a.d, Q, seed=1)
            q = factory.augment_queries(queries.numpy())
            for nprobe in a.nprobes:
                index.nprobe = nprobe
                reference = methods["search"](q)
                times = {}
                for name, fn in methods.items():
                    agreement = recall(torch.from_numpy(fn(q)), torch.from_numpy(reference))  # also the warm-up
                    seconds = []
                    for _ in range(a.repeats):
                        t = time.perf_counter()
                        fn(q)
                        seconds.append(time.perf_counter() - t)
                    times[name] = statistics.median(seconds)
                    rows.append({"keys": n, "queries": Q, "nprobe": nprobe, "method": name,
                                 "ms": round(times[name] * 1e3, 2), "vs_search": round(times[name] / times["search"], 3),
                                 "same_ids": round(agreement, 4), "repeats": a.repeats})
                    print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """The batched scan's time over the plain search's against the index size, a line per (queries, nprobe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for Q, nprobe in dict.fromkeys((r["queries"], r["nprobe"]) for r in rows):
        sub = [r for r in rows if (r["queries"], r["nprobe"], r["method"]) == (Q, nprobe, "big_batch")]
        ax.plot([r["keys"] for r in sub], [r["vs_search"] for r in sub], marker="o", label=f"{Q} queries, nprobe {nprobe}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="keys in the index", ylabel="big_batch time / index.search time",
           title="Faiss query-batched IVF scan vs plain search (below 1: faster)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    a = parse_args(argv)
    rows = run(a)
    stem = "bench_ivf_scan" + (f"_{a.tag}" if a.tag else "")
    RESULTS.mkdir(exist_ok=True)
    write_csv(RESULTS / f"{stem}.csv", rows)
    text = (f"**IVF{a.nlist},Flat search (d = {a.d} + 1, l2-augmented), k = {a.k}: plain `index.search` against "
            "`faiss.contrib.big_batch_search` (`scan=big_batch`)** (vs_search: time / plain search's; "
            "same_ids: share of the plain search's ids found)\n\n"
            + md_table(rows, ["keys", "queries", "nprobe", "method", "ms", "vs_search", "same_ids", "repeats"])
            + "\n\n"
            + settings_text(a))
    (RESULTS / f"{stem}.md").write_text(text)
    plot(rows, RESULTS / f"{stem}.png")
    print(text)


if __name__ == "__main__":
    main()
