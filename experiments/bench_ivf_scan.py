"""Does Faiss's query-batched IVF scan speed up the memory's searches?

At 1M tokens a passkey trial of the demo model spends ~90% of its time in ``IndexIVF::search``, mostly in the
per-vector distance loop over the probed lists. Faiss ships a query-batched alternative,
``faiss.contrib.big_batch_search`` (memory spec option ``scan=big_batch``): it visits each inverted list once,
computes the distances of all queries that probe it with one matrix product (``pairwise_distances``; its
``knn_function`` variant was slower than the plain search everywhere we measured), and merges the results, with a
fixed Python cost per list. This benchmark times both on the searches a memory layer makes: one (row, head) index of
``--keys`` keys augmented as ``KnnStore`` does for ``metric=l2`` (d + 1 dimensions), ``--queries`` queries a search
(a window of the demo model: 256; of the official 3B checkpoints: 2048), k = 32, for each nprobe and index size; side
by side in one process (medians of torch.utils.benchmark), with the share of the plain search's ids the batched scan
returns (1.0: the same neighbours).

    python -m experiments.bench_ivf_scan                 # ~5 minutes on one core
    python -m experiments.bench_ivf_scan --keys 100000 --nprobes 8 32 --seconds 0.5   # quick look

Keys and queries are synthetic (``bench_memory.unit_data``, clustered unit vectors), so the inverted lists are about
equally full; real keys of repeated filler fill a few lists far more. Method ``torch_coarse`` is what the store does
for ``scan=index`` on the CPU: the coarse step (nearest nprobe centroids) as a torch matrix product and top-k, then
Faiss's ``search_preassigned`` (one head here; the store batches the coarse step over a row's heads). Rows go to
experiments/results/results.csv.
"""

import argparse

from experiments import common
from experiments.bench_memory import unit_data


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.bench_ivf_scan", description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, nargs="+", default=[65536, 262144, 1048576],
                   help="index sizes (a 1M-token read searches 524288 keys on average)")
    p.add_argument("--queries", type=int, nargs="+", default=[256, 2048], help="queries a search")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobes", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--d", type=int, default=32, help="head dim (the index gets d + 1)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--seconds", type=float, default=2.0, help="time spent on each measurement")
    p.add_argument("--threads", type=int, default=1, help="knn_index.set_num_threads (torch and faiss)")
    p.add_argument("--run", default=None, help="the run's label (default: its start time)")
    a = p.parse_args(argv)
    if min(a.nlist, a.d, a.k, a.threads, *a.keys, *a.queries, *a.nprobes) < 1 or a.seconds <= 0:
        p.error("--keys, --queries, --nprobes, --nlist, --d, --k, --threads and --seconds take positive numbers")
    return a


def preassigned_search(coarse, queries, k: int):
    """Ids [nq, k] of the store's IVF path: the coarse step in torch (``knn_index.coarse``), then
    ``search_preassigned`` of the probed lists."""
    import numpy as np
    import torch

    near, lists = coarse.assign(torch.from_numpy(queries)[None], [0], coarse.ivfs[0].nprobe)
    dist, ids = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    coarse.search(0, queries, k, lists[0], near[0], dist, ids)
    return ids


def run(a) -> list[dict]:
    import numpy as np

    import knn_index
    from knn_index import factory
    from knn_index.coarse import Coarse

    knn_index.set_num_threads(a.threads)
    rows = []
    for n in a.keys:
        keys, _, _ = unit_data(n, a.d, 1, seed=0)
        x = factory.augment_keys(keys.numpy(), factory.augmentation_norm(keys.numpy()))
        index = factory.make_index(f"IVF{a.nlist},Flat", a.d, "l2")
        index.train(x[np.random.default_rng(0).choice(n, min(n, 40 * a.nlist), replace=False)])
        index.add(x)
        coarse = Coarse([index])
        methods = {"search": lambda q: index.search(q, a.k)[1],
                   "big_batch": lambda q: factory.big_batch_search(index, q, a.k)[1],
                   "torch_coarse": lambda q: preassigned_search(coarse, q, a.k)}
        for Q in a.queries:
            q = factory.augment_queries(unit_data(n, a.d, Q, seed=1)[2].numpy())
            for nprobe in a.nprobes:
                index.nprobe = nprobe
                reference = methods["search"](q)
                for name, fn in methods.items():
                    seconds, blocks = common.median_seconds(lambda: fn(q), a.seconds)
                    rows.append({"keys": n, "dim": a.d, "queries": Q, "k": a.k, "nprobe": nprobe, "method": name,
                                 "ms": round(seconds * 1e3, 2), "same_ids": round(common.recall(fn(q), reference), 4),
                                 "repeats": blocks})
                    print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    a = parse_args(argv)
    common.append_rows("bench_ivf_scan", run(a), ["ms", "same_ids", "repeats"], common.run_id(a.run),
                       common.environment("cpu", a.threads))


if __name__ == "__main__":
    main()
