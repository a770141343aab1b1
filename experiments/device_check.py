"""GPU readiness: the device's exact top-k equals the CPU's, its IVF recall matches the CPU's, read throughput.

    python -m experiments.device_check --device cuda                    # what experiments/device_check.sh runs
    python -m experiments.device_check --device cpu --keys 4000 --tokens # the same code on the CPU (tests use it)

Checks, each on the same random keys and queries on the CPU and on ``--device``:
- exact: ``KnnStore("exact")`` returns the same ids on both (as sets per query) and scores within float rounding;
- ivf: recall@k of ``KnnStore(--ivf)`` against a brute-force top-k, on the CPU and on the device (faiss-gpu where
  installed; Faiss indexes stay on the CPU otherwise, which the row records); the device may fall ``--recall-tol``
  below the CPU, since k-means on the GPU picks other centroids.
Then the demo reads ``--tokens`` filler tokens on the device with each ``--memory`` spec, against the bare windows
(``bench_read.measure``). Rows go to experiments/results/results.csv: experiment device_check (the checks) and
bench_read (the reads). Exits 1 when a check fails.
"""

import argparse
import sys

import torch

from experiments import bench_read, common

READ_SPECS = ["exact k=32", "IVF1024,Flat k=32 nprobe=8 train=grow"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.device_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--keys", type=int, default=200_000, help="keys per (row, head) in the checks")
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--ivf", default="IVF1024,Flat k=32 nprobe=32 metric=l2", help="memory spec of the recall check")
    p.add_argument("--recall-tol", type=float, default=0.03)
    p.add_argument("--tokens", type=int, nargs="*", default=[262144, 1048576], help="read throughput (none: skip)")
    p.add_argument("--memory", nargs="+", default=READ_SPECS, help="memory specs of the reads")
    p.add_argument("--threads", type=int, default=1, help="knn_index.set_num_threads (torch and faiss)")
    p.add_argument("--run", default=None, help="the run's label (default: its start time)")
    a = p.parse_args(argv)
    if min(a.keys, a.queries, a.heads, a.dim, a.k, a.threads, *a.tokens) < 1 or a.recall_tol < 0:
        p.error("--keys, --queries, --heads, --dim, --k, --tokens and --threads must be positive, --recall-tol >= 0")
    if a.k > a.keys:
        p.error("--k must not exceed --keys")
    return a


def random_data(keys: int, queries: int, heads: int, dim: int, seed: int = 0):
    """Keys, values [1, heads, keys, dim] and queries [1, heads, queries, dim], float32 on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, keys, dim, generator=gen)
    q = torch.randn(1, heads, queries, dim, generator=gen)
    return k, torch.randn(1, heads, keys, dim, generator=gen), q


def _search(spec: str, device: str, keys, values, queries, k: int):
    import knn_index

    store = knn_index.KnnStore(1, keys.shape[1], keys.shape[3], spec, dtype=torch.float32, device=device)
    store.add(keys.to(device), values.to(device))
    found = store.search(queries.to(device), k)
    on_gpu = store.faiss_index(0, 0) is not None and "Gpu" in type(store.faiss_index(0, 0)).__name__
    return found.ids.cpu(), found.scores.cpu(), on_gpu


def check_exact(device: str, keys, values, queries, k: int) -> dict:
    """The exact store on ``device`` against the CPU: share of equal id sets, largest score difference."""
    ids_cpu, scores_cpu, _ = _search(f"exact k={k}", "cpu", keys, values, queries, k)
    ids_dev, scores_dev, _ = _search(f"exact k={k}", device, keys, values, queries, k)
    same = (ids_cpu.sort(-1).values == ids_dev.sort(-1).values).all(-1).float().mean().item()
    return {"check": "exact", "device": device, "same_ids": round(same, 6),
            "max_score_diff": float((scores_cpu - scores_dev).abs().max())}


def check_ivf(device: str, spec: str, keys, values, queries, k: int) -> dict:
    """recall@k of the IVF store on the CPU and on ``device`` against a float64 brute-force top-k."""
    truth = (queries.double() @ keys.double().transpose(-1, -2)).topk(k, -1).indices
    row = {"check": "ivf", "device": device, "memory_spec": spec}
    for name, dev in (("cpu", "cpu"), ("device", device)):
        ids, _, on_gpu = _search(spec, dev, keys, values, queries, k)
        row[f"recall_{name}"] = round(common.recall(ids.flatten(0, 2).numpy(), truth.flatten(0, 2).numpy()), 4)
        if name == "device":
            row["faiss_gpu"] = on_gpu
    return row


def failures(rows: list[dict], recall_tol: float) -> list[str]:
    """What failed, one line each (empty: every check passed)."""
    bad = []
    for row in rows:
        if row["check"] == "exact" and (row["same_ids"] < 1.0 or row["max_score_diff"] > 1e-3):
            bad.append(f"exact top-k on {row['device']} differs from the CPU's: {row}")
        if row["check"] == "ivf" and row["recall_device"] < row["recall_cpu"] - recall_tol:
            bad.append(f"IVF recall on {row['device']} below the CPU's by more than {recall_tol}: {row}")
    return bad


def read_specs(specs: list[str], device: str) -> list[str]:
    """The specs worth timing on ``device``: Faiss specs only on the CPU or with faiss-gpu (without it their
    indexes stay on the CPU, and a 1M-token read would take the CPU's ~10 minutes)."""
    from knn_index import MemorySpec, factory

    keep = [s for s in specs if device == "cpu" or MemorySpec.parse(s).kind != "faiss" or factory.gpu_available()]
    for spec in sorted(set(specs) - set(keep)):
        print(f"device_check: not timing {spec!r} on {device}: this Faiss build has no GPU support", flush=True)
    return keep


def main(argv=None) -> int:
    import knn_index

    a = parse_args(argv)
    knn_index.set_num_threads(a.threads)
    env, run = common.environment(a.device, a.threads), common.run_id(a.run)
    data = random_data(a.keys, a.queries, a.heads, a.dim)
    rows = [check_exact(a.device, *data, a.k), check_ivf(a.device, a.ivf, *data, a.k)]
    for row in rows:
        row.update(keys=a.keys, queries=a.queries, heads=a.heads, dim=a.dim, k=a.k)
        print(row, flush=True)
    common.append_rows("device_check", rows, ["same_ids", "max_score_diff", "recall_cpu", "recall_device"], run, env)
    bad = failures(rows, a.recall_tol)
    specs = read_specs(a.memory, a.device)
    for tokens in a.tokens if specs else []:
        reads = bench_read.measure(tokens, specs, a.device, floor_repeats=1)
        for row in reads:
            print(row, flush=True)
        common.append_rows("bench_read", reads, bench_read.METRICS, run, env)
    for line in bad:
        print("FAILED:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
