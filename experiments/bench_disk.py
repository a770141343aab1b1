"""Memory that fits: kNN memory with keys and values on disk (`storage=disk`) against the same memory in RAM.

Two experiments, every case in a fresh process (so its peak RSS is its own), one thread by default:

- `store`: a LongLLaMA-3B-shaped memory (3 memory layers x 32 heads x head dim 100, bf16 keys and values, windows of
  2048 tokens; synthetic clustered keys through `KnnStore`, no model) built to N tokens: peak RSS, add throughput,
  bytes on disk, then the search latency of one layer (Q queries per head) and, where the keys fit in RAM, recall@k
  against the exact top-k and the share of results identical to the in-RAM store's at the same index settings.
  The same synthetic window is added to the three layers (each layer is its own store, as in the model).
- `read`: the demo model reading N filler tokens with `Document.read` in disk and RAM mode at the same index settings:
  seconds, peak RSS, and passkey answers of a few trials in both modes.
- `growth`: RAM storage of one 3B-shaped layer filled window by window, its capacity grown by doubling or reserved
  exactly first (as `Document.read` does when it knows the token count): peak RSS.

    python -m experiments.bench_disk store --tokens 65536 --compare            # RAM and disk side by side
    python -m experiments.bench_disk store --tokens 1048576 --modes disk       # the 1M-token build (~38 GB of files)
    python -m experiments.bench_disk read --tokens 65536 262144 --passkey-tokens 8192 --trials 3
    python -m experiments.bench_disk read --tokens 1048576 --memory "exact k=8 block=64" --attn-implementation sdpa
    python -m experiments.bench_disk growth       # RAM storage: capacity reserved exactly vs grown by doubling

Rows go to experiments/results/results.csv (experiments `disk_store`, `disk_read` and `disk_growth`).
"""

import argparse
import multiprocessing as mp
import os
import time

from experiments import common

STORE_SPEC = "IVF64,PQ25x4fs k=32 k_factor=8 nprobe=8"
READ_SPEC = "IVF1024,SQ8 k=32 k_factor=2 nprobe=8 train=grow"
SHAPE_3B = dict(layers=3, heads=32, head_dim=100, window=2048)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.bench_disk", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="experiment", required=True)
    store = sub.add_parser("store", help="3B-shaped memory through KnnStore")
    store.add_argument("--tokens", type=int, nargs="+", default=[65536])
    store.add_argument("--modes", nargs="+", default=["ram", "disk"], choices=["ram", "disk"])
    store.add_argument("--memory", default=STORE_SPEC, help="memory spec (storage= is set per mode)")
    store.add_argument("--queries", type=int, default=64, help="queries per head of the timed search")
    store.add_argument("--compare", action="store_true",
                       help="also compute the exact top-k of layer 0 (keys must fit in RAM) for recall")
    read = sub.add_parser("read", help="the demo model reading N tokens")
    read.add_argument("--tokens", type=int, nargs="+", default=[65536])
    read.add_argument("--modes", nargs="+", default=["ram", "disk"], choices=["ram", "disk"])
    read.add_argument("--memory", default=READ_SPEC, help="memory spec (storage= is set per mode)")
    read.add_argument("--passkey-tokens", type=int, default=0, help="passkey prompt length (0: no passkey trials)")
    read.add_argument("--trials", type=int, default=3)
    read.add_argument("--attn-implementation", choices=["eager", "sdpa"], default="eager",
                      help="the demo's attention (sdpa: fused, block retrieval included)")
    growth = sub.add_parser("growth", help="RAM storage: peak RSS with the exact capacity reserved vs grown")
    growth.add_argument("--tokens", type=int, nargs="+", default=[67584])
    growth.add_argument("--modes", nargs="+", default=["grow", "reserve"], choices=["grow", "reserve"])
    for q in (store, read, growth):
        q.add_argument("--threads", type=int, default=1, help="knn_index.set_num_threads (torch and faiss)")
        q.add_argument("--ram-budget", type=int, default=256, help="ram_budget of the disk mode (MiB)")
        q.add_argument("--dir", default=None, help="folder for the disk mode's files (default: a temporary one)")
        q.add_argument("--run", default=None, help="the run's label (default: its start time)")
    a = p.parse_args(argv)
    if min(*a.tokens, a.threads) < 1:
        p.error("--tokens and --threads must be positive")
    return a


def with_storage(spec: str, mode: str, budget: int) -> str:
    return spec if mode == "ram" else f"{spec} storage=disk ram_budget={budget}"


def window_keys(gen, centers, window: int):
    """Keys [1, H, window, d] around the per-head cluster centers (bf16 later), and values derived from them."""
    import torch

    H, C, d = centers.shape
    pick = torch.randint(C, (H, window), generator=gen)
    keys = torch.gather(centers, 1, pick[..., None].expand(-1, -1, d)) + torch.randn(H, window, d, generator=gen) * 0.3
    return keys[None], keys.flip(-1)[None]


def queries_for(centers, Q: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    H, C, d = centers.shape
    pick = torch.randint(C, (H, Q), generator=gen)
    return (torch.gather(centers, 1, pick[..., None].expand(-1, -1, d)) + torch.randn(H, Q, d, generator=gen) * 0.3)[None]


def store_case(cfg) -> dict:
    """Build a 3B-shaped memory of cfg["tokens"] tokens, time adds and one layer's search, measure peak RSS."""
    import torch

    import knn_index

    knn_index.set_num_threads(cfg["threads"])
    L, H, d, W = (SHAPE_3B[k] for k in ("layers", "heads", "head_dim", "window"))
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(H, 4096, d, generator=gen)
    spec = with_storage(cfg["memory"], cfg["mode"], cfg["ram_budget"])
    dirs = [None if cfg["dir"] is None else os.path.join(cfg["dir"], f"layer{i}") for i in range(L)]
    stores = [knn_index.KnnStore(1, H, d, spec, dtype=torch.bfloat16, directory=dirs[i] if cfg["mode"] == "disk"
                                 else None) for i in range(L)]
    for s in stores:
        s.reserve(cfg["tokens"])
    common.reset_peak_rss()
    start_rss = common.rss_mb("VmRSS")
    add_s, truth_keys = 0.0, []
    for w in range(cfg["tokens"] // W):
        if w % 64 == 0:
            print(f"  {cfg['mode']}: {w * W} tokens, add {add_s:.0f} s, peak RSS {common.rss_mb():.0f} MiB", flush=True)
        keys, values = window_keys(gen, centers, W)
        keys = keys.to(torch.bfloat16)
        if cfg["compare"]:
            truth_keys.append(keys[0].float())
        began = time.perf_counter()
        for s in stores:
            s.add(keys, values)
        add_s += time.perf_counter() - began
    build_peak = common.rss_mb()
    queries = queries_for(centers, cfg["queries"], seed=1)
    stores[0].search(queries[:, :, :4])  # warm up
    common.reset_peak_rss()
    search_s, repeats = common.median_seconds(lambda: stores[0].search(queries), 1.0)
    found = stores[0].search(queries)
    row = dict(add_s=round(add_s, 1), add_tokens_per_s=round(cfg["tokens"] / add_s),
               build_peak_rss_mb=build_peak, start_rss_mb=start_rss,
               search_ms=round(1e3 * search_s, 1), search_repeats=repeats, search_peak_rss_mb=common.rss_mb(),
               disk_gb=round(sum(s.disk_nbytes() for s in stores) / 1e9, 2))
    if cfg["compare"]:
        keys = torch.cat(truth_keys, dim=1)  # [H, N, d]
        truth = torch.einsum("hqd,hnd->hqn", queries[0].float(), keys).topk(found.k, dim=-1).indices
        row["recall"] = round(common.recall(found.ids[0].numpy(), truth.numpy()), 4)
    ids = found.ids.numpy().copy()
    for s in stores:
        s.close()
    return dict(row, ids=ids, scores=found.scores.numpy().copy(), values=found.values.float().numpy().copy())


def read_case(cfg) -> dict:
    """The demo model reads cfg["tokens"] filler tokens with Document.read; then passkey trials."""

    import knn_index
    from experiments.bench_read import filler_ids
    from knn_longllama.demo import load_demo
    from knn_longllama.document import Document
    from knn_longllama.passkey import passkey_accuracy

    knn_index.set_num_threads(cfg["threads"])
    model, tokenizer = load_demo(attn_implementation=cfg.get("attn_implementation", "eager"))
    spec = with_storage(cfg["memory"], cfg["mode"], cfg["ram_budget"])
    ids = filler_ids(tokenizer, cfg["tokens"])
    common.reset_peak_rss()
    doc, seconds = common.timed(lambda: Document.read(model, ids, memory_spec=spec, progress=False))
    row = dict(seconds=round(seconds, 1), peak_rss_mb=common.rss_mb(),
               memory_mb=round(sum(m.nbytes() for m in doc.memories.values()) / 2**20, 1),
               disk_mb=round(sum(m.store.disk_nbytes() for m in doc.memories.values()) / 2**20, 1))
    doc.close()
    del doc
    if cfg["passkey_tokens"]:
        result = passkey_accuracy(model, tokenizer, cfg["passkey_tokens"], trials=cfg["trials"], seed=0,
                                  memory_spec=spec)
        row.update(passkey_correct=result["correct"], passkey_trials=result["trials"],
                   passkey_generated=" ".join("-".join(map(str, r["generated"])) for r in result["results"]))
    return row


def growth_case(cfg) -> dict:
    """One 3B-shaped layer (32 heads x 100, bf16, exact) in RAM filled with cfg["tokens"] tokens window by window,
    its capacity grown by doubling or reserved exactly first: peak RSS over the start."""
    import torch

    import knn_index

    knn_index.set_num_threads(cfg["threads"])
    H, d, W = SHAPE_3B["heads"], SHAPE_3B["head_dim"], SHAPE_3B["window"]
    gen = torch.Generator().manual_seed(0)
    window = torch.randn(1, H, W, d, generator=gen).to(torch.bfloat16)
    store = knn_index.KnnStore(1, H, d, "exact k=32", dtype=torch.bfloat16)
    common.reset_peak_rss()
    start = common.rss_mb("VmRSS")
    if cfg["mode"] == "reserve":
        store.reserve(cfg["tokens"])
    for _ in range(cfg["tokens"] // W):
        store.add(window, window)
    return dict(peak_over_start_mb=round(common.rss_mb() - start, 1),
                stored_mb=round(cfg["tokens"] // W * W * H * d * 2 * 2 / 2**20, 1),
                allocated_mb=round(store.nbytes() / 2**20, 1))


def run_isolated(ctx, fn, cfg) -> dict:
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, (cfg,))


def main(argv=None) -> None:
    import numpy as np

    a = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve others on shared cores
    ctx = mp.get_context("forkserver")
    run, env = common.run_id(a.run), common.environment("cpu", a.threads)
    for tokens in a.tokens:
        results = {}
        for mode in a.modes:
            cfg = dict(vars(a), tokens=tokens, mode=mode)
            setting = dict(mode=mode, tokens=tokens, memory_spec=getattr(a, "memory", ""), threads=a.threads)
            if a.experiment == "store":
                row = run_isolated(ctx, store_case, cfg)
                results[mode] = {k: row.pop(k) for k in ("ids", "scores", "values")}
                setting.update(layers=3, heads=32, head_dim=100, queries=a.queries)
                if mode == "disk" and "ram" in results:
                    same = results["ram"]["ids"] == results["disk"]["ids"]
                    row["same_ids"] = round(float(same.mean()), 4)
                    row["same_results"] = all(np.array_equal(results["ram"][k], results["disk"][k])
                                              for k in ("ids", "scores", "values"))
                metrics = ["add_s", "add_tokens_per_s", "build_peak_rss_mb", "start_rss_mb", "search_ms",
                           "search_repeats", "search_peak_rss_mb", "disk_gb", "recall", "same_ids", "same_results"]
            elif a.experiment == "growth":
                row = run_isolated(ctx, growth_case, cfg)
                setting.update(memory_spec="exact k=32", layers=1, heads=32, head_dim=100)
                metrics = ["peak_over_start_mb", "stored_mb", "allocated_mb"]
            else:
                row = run_isolated(ctx, read_case, cfg)
                setting.update(passkey_tokens=a.passkey_tokens, attention=a.attn_implementation)
                metrics = ["seconds", "peak_rss_mb", "memory_mb", "disk_mb", "passkey_correct", "passkey_trials",
                           "passkey_generated"]
            print(setting, row, flush=True)
            common.append_rows(f"disk_{a.experiment}", [dict(setting, **row)], metrics, run, env)


if __name__ == "__main__":
    main()
