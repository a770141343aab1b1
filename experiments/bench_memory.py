"""Benchmark of the kNN memory (knn_index.KnnStore) on CPU.

Part 1, library overhead: ``store.search`` (Faiss search + exact re-score + value gather) against a raw
``index.search`` on the same index and queries, one (row, head), per index type. Target: <= 1.25x raw.

Part 2, memory-layer time per window vs memory size: dense attention over all keys (q @ K^T, softmax, @ V in float32
torch, what a dense memory layer does for one head) against kNN attention (store.search + softmax over the k
retrieved scores + weighted sum of their values), per window of Q queries. Also: build time, recall@k against exact
search, bytes held (K/V tensors, or store.nbytes()), and peak RSS (VmHWM, one process per configuration) of the
setup (data + build) and of one window.

Every configuration runs in its own process, forked from a server that has torch and faiss already imported. Keys,
values and queries are synthetic unit vectors (`unit_data`). Rows go to experiments/results/results.csv.

    python -m experiments.bench_memory --quick   # < 2 minutes
    python -m experiments.bench_memory           # full grid, up to 1M keys
"""

import argparse
import gc
import math
import multiprocessing as mp
import os

from experiments import common

# name -> (factory string, search params) for part 1
OVERHEAD_INDEXES = {"Flat": ("Flat", {}), "IVF1024,Flat": ("IVF1024,Flat", {"nprobe": 32}), "HNSW32": ("HNSW32", {}),
                    "IVF1024,PQ16": ("IVF1024,PQ16", {"nprobe": 32}), "SQ8": ("SQ8", {})}
SCALING_METHODS = ["dense", "torch", "Flat", "IVF,Flat", "HNSW32", "IVF,PQ", "SQ8"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.bench_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small grid, < 2 minutes (default: the full grid)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="knn_index.set_num_threads (torch and faiss); default: all cores")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for the workers ('unset' keeps the environment). torch and faiss each "
                        "ship an OpenMP runtime; spinning idle threads of one starve the other on few cores")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the kNN store (dense attention always uses float32)")
    p.add_argument("--data", default="clustered", choices=["clustered", "random"],
                   help="synthetic keys: clustered (default) or i.i.d. random unit vectors (hardest for ANN)")
    p.add_argument("--queries", type=int, default=512, help="queries per window (256 tokens x 2 query heads)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--overhead-size", type=int, help="keys in part 1 (default 100k, quick 50k)")
    p.add_argument("--sizes", type=int, nargs="+", help="memory sizes for part 2")
    p.add_argument("--dims", type=int, nargs="+", help="head dims for part 2 (default 64 128; quick 64)")
    p.add_argument("--hnsw-max", type=int, help="largest memory size for HNSW in part 2 (its build is slow)")
    p.add_argument("--exhaustive-max", type=int,
                   help="largest memory size for the exhaustive Faiss indexes Flat and SQ8 in part 2")
    p.add_argument("--big-dim-max", type=int, help="largest memory size for head dims above 64 in part 2")
    p.add_argument("--seconds", type=float, help="time spent on each measurement (median reported; default 5, quick 1)")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--run", default=None, help="the run's label (default: its start time)")
    a = p.parse_args(argv)
    q = a.quick
    a.overhead_size = a.overhead_size or (50_000 if q else 100_000)
    a.sizes = a.sizes or ([1000, 8000, 64000] if q else [1000, 4000, 16000, 64000, 256000, 1000000])
    a.dims = a.dims or ([64] if q else [64, 128])
    a.hnsw_max = a.hnsw_max or (64_000 if q else 256_000)
    a.exhaustive_max = a.exhaustive_max or (64_000 if q else 256_000)
    a.big_dim_max = a.big_dim_max or (64_000 if q else 256_000)
    a.seconds = a.seconds or (1.0 if q else 5.0)
    return a


def unit_data(n: int, d: int, q: int, seed: int, kind: str = "clustered"):
    """Unit keys, random values and unit queries.

    clustered: keys and queries = normalize(center + N(0, 1/d) noise), with max(16, n / 256) random unit centers
    (cosine to own center ~0.7), a stand-in for the topical structure of attention keys. random: i.i.d. unit
    vectors, the worst case for IVF/HNSW.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    values = torch.randn(n, d, generator=g)
    if kind == "random":
        return unit(torch.randn(n, d, generator=g), dim=-1), values, unit(torch.randn(q, d, generator=g), dim=-1)
    centers = unit(torch.randn(max(16, n // 256), d, generator=g), dim=-1)

    def around(m):
        pick = torch.randint(len(centers), (m,), generator=g)
        return unit(centers[pick] + torch.randn(m, d, generator=g) / math.sqrt(d), dim=-1)

    return around(n), values, around(q)


def overhead_case(cfg) -> dict:
    """Part 1: store.search vs raw index.search on one (row, head)."""
    import torch

    import knn_index

    knn_index.set_num_threads(cfg["threads"])
    n, d, Q, k = cfg["keys"], cfg["dim"], cfg["queries"], cfg["k"]
    keys, values, queries = unit_data(n, d, Q, seed=0, kind=cfg["data"])
    spec = knn_index.MemorySpec(cfg["factory"], k=k, index_params=cfg["params"])
    store = knn_index.KnnStore(1, 1, d, spec, dtype=getattr(torch, cfg["dtype"]))
    _, build = common.timed(lambda: store.add(keys[None, None], values[None, None]))
    index, q4, qn = store.faiss_index(0, 0), queries[None, None].contiguous(), queries.numpy()
    raw, _ = common.median_seconds(lambda: index.search(qn, k), cfg["seconds"])
    ours, blocks = common.median_seconds(lambda: store.search(q4, k), cfg["seconds"])
    truth = (queries @ keys.T).topk(k, dim=-1).indices
    return dict(memory_spec=str(spec), build_s=round(build, 2), repeats=blocks, raw_ms=round(1e3 * raw, 2),
                ours_ms=round(1e3 * ours, 2), recall=round(common.recall(store.search(q4, k).ids[0, 0], truth), 3))


def scaling_config(method: str, n: int) -> tuple[str, dict, int]:
    """Factory string, search params and k_factor for a memory of n keys.

    IVF: nlist = power of two below min(4 sqrt(n), n / 39, 1024); nprobe = max(4, nlist / 32). IVF-PQ re-scores 4k
    candidates (k_factor=4). Trained at once (train_size = min(n, default)).
    """
    nlist = 2 ** int(math.log2(min(4 * math.sqrt(n), n / 39, 1024)))
    ivf = dict(nprobe=max(4, nlist // 32))
    return {
        "torch": ("torch", {}, 1),  # exact backend (matmul + topk in torch)
        "Flat": ("Flat", {}, 1),
        "IVF,Flat": (f"IVF{nlist},Flat", ivf, 1),
        "HNSW32": ("HNSW32", {}, 1),
        "IVF,PQ": (f"IVF{nlist},PQ{'16' if n >= 10_240 else '16x4'}", ivf, 4),
        "SQ8": ("SQ8", {}, 1),
    }[method]


def warm_up(d: int, Q: int, k: int) -> None:
    """Run both paths once on tiny data so one-off runtime buffers (BLAS, OpenMP) are not counted as held."""
    import torch

    import knn_index

    keys, values, queries = unit_data(4 * k, d, Q, seed=2, kind="random")
    torch.softmax(queries @ keys.T, dim=-1) @ values
    store = knn_index.KnnStore(1, 1, d)
    store.add(keys[None, None], values[None, None])
    store.search(queries[None, None], k)


def scaling_case(cfg) -> dict:
    """Part 2: time of one memory-layer window (Q queries, one head) and memory."""
    import torch

    import knn_index

    knn_index.set_num_threads(cfg["threads"])
    n, d, Q, k, method = cfg["keys"], cfg["dim"], cfg["queries"], cfg["k"], cfg["method"]
    warm_up(d, Q, k)
    base = common.rss_mb("VmRSS")
    keys, values, queries = unit_data(n, d, Q, seed=1, kind=cfg["data"])
    row = dict(index="", build_s=0.0)
    scale = 1 / math.sqrt(d)
    if method == "dense":
        held = keys.nbytes + values.nbytes

        def window():
            return torch.softmax((queries @ keys.T) * scale, dim=-1) @ values
    else:
        factory, params, k_factor = scaling_config(method, n)
        train_size = None if factory == "torch" else (
            min(n, knn_index.default_train_size(knn_index.make_index(factory, d))) or None)
        spec = knn_index.MemorySpec(factory, k=k, index_params=params, k_factor=k_factor)
        store = knn_index.KnnStore(1, 1, d, spec, train_size=train_size, dtype=getattr(torch, cfg["dtype"]))
        _, build = common.timed(lambda: store.add(keys[None, None], values[None, None]))
        truth = (queries[:128] @ keys.T).topk(k, dim=-1).indices
        del keys, values
        q4 = queries[None, None].contiguous()
        row.update(index=str(spec), build_s=round(build, 2),
                   recall=round(common.recall(store.search(q4[:, :, :128], k).ids[0, 0], truth), 3))
        held = store.nbytes()

        def window():
            res = store.search(q4, k)
            p = torch.softmax(res.scores * scale, dim=-1)
            return torch.matmul(p.unsqueeze(-2), res.values.float()).squeeze(-2)
    gc.collect()
    setup_peak = common.rss_mb() - base
    common.reset_peak_rss()
    before = common.rss_mb("VmRSS")
    seconds, blocks = common.median_seconds(window, cfg["seconds"])
    return dict(row, repeats=blocks, window_ms=round(1e3 * seconds, 2), held_mib=round(held / 2**20, 1),
                setup_peak_mib=round(setup_peak, 1), window_peak_mib=round(common.rss_mb() - before, 1))


def run_isolated(ctx, fn, cfg) -> dict:
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, (cfg,))


def skipped(a, method: str, n: int, d: int) -> bool:
    """Configurations left out to bound the run time (see --hnsw-max, --exhaustive-max, --big-dim-max)."""
    return ((method == "HNSW32" and n > a.hnsw_max) or (method in ("Flat", "SQ8") and n > a.exhaustive_max)
            or (d > 64 and n > a.big_dim_max))


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy  # read by each OpenMP runtime when it loads
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "faiss", "numpy", "knn_index"])
    run, env = common.run_id(a.run), common.environment("cpu", a.threads)
    shared = dict(queries=a.queries, k=a.k, dtype=a.dtype, data=a.data)
    work = dict(threads=a.threads, seconds=a.seconds)
    for name, (factory, params) in OVERHEAD_INDEXES.items() if not a.skip_overhead else []:
        setting = dict(index=name, keys=a.overhead_size, dim=64, **shared)
        row = run_isolated(ctx, overhead_case, dict(setting, factory=factory, params=params, **work))
        common.append_rows("bench_memory_overhead", [dict(setting, **row)],
                           ["build_s", "repeats", "raw_ms", "ours_ms", "recall"], run, env)
        print(setting, row, flush=True)
    for d in a.dims if not a.skip_scaling else []:
        for n in a.sizes:
            for method in SCALING_METHODS:
                if skipped(a, method, n, d):
                    continue
                setting = dict(method=method, keys=n, dim=d, **shared)
                row = run_isolated(ctx, scaling_case, dict(setting, **work))
                common.append_rows("bench_memory_scaling", [dict(setting, **row)],
                                   ["build_s", "recall", "repeats", "window_ms", "held_mib", "setup_peak_mib",
                                    "window_peak_mib"], run, env)
                print(setting, row, flush=True)


if __name__ == "__main__":
    main()
