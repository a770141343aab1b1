#!/usr/bin/env python
"""Benchmark of the kNN memory (knn_index.KnnStore) on CPU.

Part 1, library overhead: ``store.search`` (Faiss search + exact re-score +
value gather) against a raw ``index.search`` on the same index and queries,
one (row, head), per index type. Target: <= 1.25x raw.

Part 2, memory-layer time per window vs memory size: dense attention over all
keys (q @ K^T, softmax, @ V in float32 torch, what a dense memory layer does
for one head) against kNN attention (store.search + softmax over the k
retrieved scores + weighted sum of their values), per window of Q queries.
Also: build time, recall@k against exact search, bytes held (K/V tensors,
or store.nbytes()), and peak RSS (VmHWM, one process per configuration) of
the setup (data + build) and of one window.

Every configuration runs in its own process, forked from a server that has
torch and faiss already imported. Keys, values and queries are random unit
vectors (no structure: the hard case for IVF/HNSW).

    python experiments/bench_memory.py --quick   # < 2 minutes
    python experiments/bench_memory.py           # full grid, up to 1M keys
"""

import argparse
import csv
import math
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (factory string, search params) for part 1
OVERHEAD_INDEXES = {
    "Flat": ("Flat", {}),
    "IVF1024,Flat": ("IVF1024,Flat", {"nprobe": 32}),
    "HNSW32": ("HNSW32", {}),
    "IVF1024,PQ16": ("IVF1024,PQ16", {"nprobe": 32}),
    "SQ8": ("SQ8", {}),
}
SCALING_METHODS = ["dense", "torch", "Flat", "IVF,Flat", "HNSW32", "IVF,PQ", "SQ8"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small grid, < 2 minutes")
    mode.add_argument("--full", action="store_true", help="full grid (the default): up to 1M keys, d 64 and 128")
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
    p.add_argument("--sizes", type=str, help="comma-separated memory sizes for part 2")
    p.add_argument("--dims", type=str, help="comma-separated head dims for part 2 (default 64,128; quick 64)")
    p.add_argument("--hnsw-max", type=int, help="largest memory size for HNSW in part 2 (its build is slow)")
    p.add_argument("--exhaustive-max", type=int,
                   help="largest memory size for the exhaustive Faiss indexes Flat and SQ8 in part 2")
    p.add_argument("--big-dim-max", type=int, help="largest memory size for head dims above 64 in part 2")
    p.add_argument("--repeats", type=int,
                   help="timed repeats per measurement (median reported; cut to >= 3 when one call is slow)")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    a = p.parse_args()
    q = a.quick
    a.overhead_size = a.overhead_size or (50_000 if q else 100_000)
    a.sizes = [int(x) for x in (a.sizes or ("1000,8000,64000" if q else
                                            "1000,4000,16000,64000,256000,1000000")).split(",")]
    a.dims = [int(x) for x in (a.dims or ("64" if q else "64,128")).split(",")]
    a.hnsw_max = a.hnsw_max or (64_000 if q else 256_000)
    a.exhaustive_max = a.exhaustive_max or (64_000 if q else 256_000)
    a.big_dim_max = a.big_dim_max or (64_000 if q else 256_000)
    a.repeats = a.repeats or (3 if q else 11)
    a.suffix = "_quick" if q else ""
    return a


# ------------------------------------------------------------------ measuring (in workers)
def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def median_seconds(fns: dict, repeats: int, budget_s: float = 20.0) -> tuple[dict, int]:
    """Median wall time of each callable, interleaved over repeats after one warm-up.

    Repeats are cut (to no fewer than 3) so one measurement takes about budget_s.
    Returns the medians and the number of repeats used.
    """
    times = {name: [] for name in fns}
    t = time.perf_counter()
    for fn in fns.values():
        fn()
    once = time.perf_counter() - t
    repeats = max(3, min(repeats, int(budget_s / max(once, 1e-9))))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}, repeats


def unit_data(n: int, d: int, q: int, seed: int, kind: str = "clustered"):
    """Unit keys, random values and unit queries.

    clustered: keys and queries = normalize(center + N(0, 1/d) noise), with
    max(16, n / 256) random unit centers (cosine to own center ~0.7), a stand-in
    for the topical structure of attention keys. random: i.i.d. unit vectors,
    the worst case for IVF/HNSW.
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


def exact_ids(queries, keys, k):
    return (queries @ keys.T).topk(k, dim=-1).indices


def recall(found, truth) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.numel()


def setup_worker(cfg) -> None:
    import knn_index

    knn_index.set_num_threads(cfg["threads"])


def overhead_case(cfg) -> dict:
    """Part 1: store.search vs raw index.search on one (row, head)."""
    import torch
    import knn_index

    setup_worker(cfg)
    n, d, Q, k = cfg["n"], cfg["d"], cfg["queries"], cfg["k"]
    keys, values, queries = unit_data(n, d, Q, seed=0, kind=cfg["data"])
    spec = knn_index.MemorySpec(cfg["factory"], index_params=cfg["params"])
    store = knn_index.KnnStore(1, 1, d, spec, dtype=getattr(torch, cfg["dtype"]))
    t = time.perf_counter()
    store.add(keys[None, None], values[None, None])
    build = time.perf_counter() - t
    index, q4 = store.faiss_index(0, 0), queries[None, None].contiguous()
    qn = queries.numpy()
    med, reps = median_seconds({"raw": lambda: index.search(qn, k), "ours": lambda: store.search(q4, k)},
                               cfg["repeats"], budget_s=60)
    truth = exact_ids(queries, keys, k)
    return dict(index=cfg["name"], params=fmt_params(cfg["params"]), n=n, d=d, queries=Q, k=k,
                build_s=round(build, 2), repeats=reps, raw_ms=round(1e3 * med["raw"], 2), ours_ms=round(1e3 * med["ours"], 2),
                ratio=round(med["ours"] / med["raw"], 3), recall=round(recall(store.search(q4, k).ids[0, 0], truth), 3))


def scaling_config(method: str, n: int) -> tuple[str, dict, int]:
    """Factory string, search params and k_factor for a memory of n keys.

    IVF: nlist = power of two below min(4 sqrt(n), n / 39, 1024); nprobe =
    max(4, nlist / 32). IVF-PQ re-scores 4k candidates (k_factor=4). Trained
    at once (train_size = min(n, default)).
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
    import gc

    import torch
    import knn_index

    setup_worker(cfg)
    n, d, Q, k, method = cfg["n"], cfg["d"], cfg["queries"], cfg["k"], cfg["method"]
    warm_up(d, Q, k)
    base = proc_status_kib("VmRSS")
    keys, values, queries = unit_data(n, d, Q, seed=1, kind=cfg["data"])
    row = dict(method=method, index="", n=n, d=d, queries=Q, k=k, build_s=0.0, recall="")
    scale = 1 / math.sqrt(d)
    if method == "dense":
        held = keys.nbytes + values.nbytes

        def window():
            p = torch.softmax((queries @ keys.T) * scale, dim=-1)
            return p @ values
    else:
        factory, params, k_factor = scaling_config(method, n)
        train_size = None if factory == "torch" else (
            min(n, knn_index.default_train_size(knn_index.make_index(factory, d))) or None)
        row["index"] = factory + "".join(f" {a}={b}" for a, b in params.items()) + (
            f" k_factor={k_factor}" if k_factor > 1 else "")
        spec = knn_index.MemorySpec(factory, index_params=params, k_factor=k_factor)
        store = knn_index.KnnStore(1, 1, d, spec, train_size=train_size, dtype=getattr(torch, cfg["dtype"]))
        t = time.perf_counter()
        store.add(keys[None, None], values[None, None])
        row["build_s"] = round(time.perf_counter() - t, 2)
        truth = exact_ids(queries[:128], keys, k)
        del keys, values
        q4 = queries[None, None].contiguous()
        row["recall"] = round(recall(store.search(q4[:, :, :128], k).ids[0, 0], truth), 3)
        held = store.nbytes()

        def window():
            res = store.search(q4, k)
            p = torch.softmax(res.scores * scale, dim=-1)
            return torch.matmul(p.unsqueeze(-2), res.values.float()).squeeze(-2)
    gc.collect()
    setup_peak = proc_status_kib("VmHWM") - base
    reset_peak()
    before = proc_status_kib("VmRSS")
    med, reps = median_seconds({"w": window}, cfg["repeats"])
    row.update(repeats=reps, window_ms=round(1e3 * med["w"], 2), held_mib=round(held / 2**20, 1),
               setup_peak_mib=round(setup_peak / 1024, 1),
               window_peak_mib=round((proc_status_kib("VmHWM") - before) / 1024, 1))
    return row


# ------------------------------------------------------------------ orchestration
def fmt_params(params: dict) -> str:
    return ",".join(f"{a}={b}" for a, b in params.items())


def run_isolated(ctx, fn, cfg) -> dict:
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, (cfg,))


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def md_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def settings_text(a) -> str:
    import faiss
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"- threads: knn_index.set_num_threads({a.threads}) (torch and faiss); OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}\n"
            f"- machine: {os.cpu_count()} CPUs ({cpu}); torch {torch.__version__}, faiss {faiss.__version__}\n"
            f"- store dtype {a.dtype}; queries per window Q={a.queries}; k={a.k}; medians of up to {a.repeats} "
            f"repeats (column repeats) after 1 warm-up; data: {a.data} (see unit_data)\n")


def part_overhead(ctx, a) -> tuple[list[dict], str]:
    rows = []
    for name, (factory, params) in OVERHEAD_INDEXES.items():
        cfg = dict(name=name, factory=factory, params=params, n=a.overhead_size, d=64, queries=a.queries, k=a.k,
                   repeats=a.repeats, threads=a.threads, dtype=a.dtype, data=a.data)
        rows.append(run_isolated(ctx, overhead_case, cfg))
        print(rows[-1], flush=True)
    write_csv(RESULTS / f"bench_memory_overhead{a.suffix}.csv", rows)
    cols = ["index", "params", "n", "d", "queries", "k", "build_s", "repeats", "raw_ms", "ours_ms", "ratio", "recall"]
    worst = max(r["ratio"] for r in rows)
    text = (f"## Library overhead: store.search vs raw index.search ({a.overhead_size} keys, d=64)\n\n"
            + md_table(rows, cols)
            + f"\n\nratio = ours / raw (medians); target <= 1.25x; worst: {worst:.2f}x. "
              "recall = recall@k against exact search.\n")
    return rows, text


def skipped(a, method: str, n: int, d: int) -> bool:
    """Configurations left out to bound the run time (see --hnsw-max, --exhaustive-max, --big-dim-max)."""
    return ((method == "HNSW32" and n > a.hnsw_max) or (method in ("Flat", "SQ8") and n > a.exhaustive_max)
            or (d > 64 and n > a.big_dim_max))


def part_scaling(ctx, a) -> tuple[list[dict], str]:
    rows, path = [], RESULTS / f"bench_memory_scaling{a.suffix}.csv"
    for d in a.dims:
        for n in a.sizes:
            for method in SCALING_METHODS:
                if skipped(a, method, n, d):
                    continue
                cfg = dict(method=method, n=n, d=d, queries=a.queries, k=a.k, repeats=a.repeats,
                           threads=a.threads, dtype=a.dtype, data=a.data)
                rows.append(run_isolated(ctx, scaling_case, cfg))
                write_csv(path, rows)  # after every configuration: a stopped run keeps what it measured
                print(rows[-1], flush=True)
    plot_scaling(rows, RESULTS / f"bench_memory_scaling{a.suffix}.png")
    return rows, scaling_markdown(rows, a)


def crossover(rows: list[dict], method: str, d: int) -> tuple[str, str]:
    """First measured size where `method` beats dense (log-interpolated) and speedup at its largest size."""
    dense = {r["n"]: r["window_ms"] for r in rows if r["method"] == "dense" and r["d"] == d}
    mine = {r["n"]: r["window_ms"] for r in rows if r["method"] == method and r["d"] == d}
    sizes = sorted(set(dense) & set(mine))
    if not sizes:
        return "-", "-"
    speed = {n: dense[n] / mine[n] for n in sizes}
    top = f"{speed[sizes[-1]]:.1f}x at {sizes[-1]:,}"
    slower = [i for i, n in enumerate(sizes) if speed[n] <= 1]
    if not slower:
        return f"<= {sizes[0]:,} (faster at every size)", top
    i = slower[-1]
    if i == len(sizes) - 1:
        return "not reached", top
    lo, hi = sizes[i], sizes[i + 1]
    t = math.log(speed[lo]) / (math.log(speed[lo]) - math.log(speed[hi]))  # where log(speed) crosses 0
    est = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
    return f"~{est:,.0f} (between {lo:,} and {hi:,})", top


def scaling_markdown(rows: list[dict], a) -> str:
    out = ["## Memory-layer time per window vs memory size\n",
           f"One head, Q={a.queries} queries per window, k={a.k}. dense = softmax(q K^T / sqrt(d)) V over all keys "
           "(float32 torch); kNN = store.search + softmax over the k exact scores + weighted sum of values. "
           "held = bytes of K/V (dense) or store.nbytes() (storage capacity + serialized index); window peak = "
           "RSS high-water mark during the windows above the RSS before them (VmHWM, one process per config); "
           "setup peak (CSV) = the same for data generation + build. "
           "IVF: nlist ~ 4 sqrt(n) (<= 1024), nprobe = max(4, nlist/32); IVF,PQ re-scores k_factor=4 x k candidates.\n"]
    for d in a.dims:
        sub = [r for r in rows if r["d"] == d]
        sizes = sorted({r["n"] for r in sub})
        methods = [m for m in SCALING_METHODS if any(r["method"] == m for r in sub)]
        cell = {(r["n"], r["method"]): r for r in sub}
        table = []
        for n in sizes:
            line = {"n": f"{n:,}"}
            for m in methods:
                r = cell.get((n, m))
                line[m] = "-" if r is None else f"{r['window_ms']:.1f}" + (f" (r={r['recall']})" if r["recall"] != "" else "")
            table.append(line)
        out.append(f"### d = {d}: window time in ms (r = recall@{a.k})\n\n" + md_table(table, ["n"] + methods) + "\n")
        mem = [{"n": f"{n:,}", **{m: (f"{cell[(n, m)]['held_mib']} / {cell[(n, m)]['window_peak_mib']}"
                                      if (n, m) in cell else "-") for m in methods}} for n in sizes]
        out.append(f"Memory held / window peak (MiB), d = {d}:\n\n" + md_table(mem, ["n"] + methods) + "\n")
        summ = [{"method": m, "crossover (kNN faster than dense from n =)": crossover(rows, m, d)[0],
                 "speedup at largest size": crossover(rows, m, d)[1]} for m in methods if m != "dense"]
        out.append(f"Crossover, d = {d}:\n\n" + md_table(summ, list(summ[0])) + "\n")
    return "\n".join(out)


def plot_scaling(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["d"] for r in rows})
    fig, axes = plt.subplots(2, len(dims), figsize=(6 * len(dims), 8), squeeze=False)
    for j, d in enumerate(dims):
        for m in SCALING_METHODS:
            pts = sorted((r["n"], r["window_ms"], r["held_mib"]) for r in rows if r["d"] == d and r["method"] == m)
            if pts:
                n, t, mem = zip(*pts)
                style = dict(marker="o", label=m, linewidth=2.5 if m == "dense" else 1.5)
                axes[0, j].plot(n, t, **style)
                axes[1, j].plot(n, mem, **style)
        for i, ylabel in enumerate(["time per window (ms)", "memory held (MiB)"]):
            ax = axes[i, j]
            ax.set(xscale="log", yscale="log", xlabel="memory size (keys)", ylabel=ylabel, title=f"d = {d}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    a = parse_args()
    if a.omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy  # read by each OpenMP runtime when it loads
    RESULTS.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "faiss", "numpy", "knn_index"])
    start = time.perf_counter()
    parts = [f"# bench_memory{' --quick' if a.quick else ''}\n", settings_text(a)]
    for name, run, skip in (("overhead", part_overhead, a.skip_overhead), ("scaling", part_scaling, a.skip_scaling)):
        if not skip:
            text = run(ctx, a)[1]
            (RESULTS / f"bench_memory_{name}{a.suffix}.md").write_text(parts[0] + parts[1] + "\n" + text)
            parts.append(text)
    parts.append(f"\nTotal benchmark time: {time.perf_counter() - start:.0f} s\n")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
