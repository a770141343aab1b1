"""Forward-pass benchmark: our LongLLaMA vs transformers' LlamaForCausalLM, and dense-memory ingestion.

Part 1 (plain path): the same weights and inputs, within one window and without memory, side by side in one run:
prefill tokens/s and greedy decode tokens/s for transformers (sdpa, eager) and ours (matmul + fp32 softmax as the
official code, and fused SDPA with `torch_attention=True`). Medians over repeats; ratios against transformers sdpa.

Part 2 (dense memory): time and peak RAM to ingest N tokens into dense memory (8k..64k), with the official
matmul + fp32 softmax and with fused SDPA over [local ; memory] (`torch_attention=True`) side by side, each (N,
attention) in a fresh subprocess so that peak RSS is its own; the ratio column is official time / SDPA time.

    python experiments/bench_forward.py            # full
    python experiments/bench_forward.py --quick    # a minute or two
    python experiments/bench_forward.py --skip-plain --ingest-tokens 8192 16384 32768   # dense ingestion only
Writes experiments/results/bench_forward_plain.{csv,md} and bench_forward_ingest.{csv,md,png}.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

PLAIN = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048)
INGEST = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
              max_position_embeddings=512, last_context_length=256, mem_layers=[2, 4], mem_dtype="bfloat16")


def set_threads(n: int) -> None:
    try:
        import knn_index

        knn_index.set_num_threads(n)
    except ImportError:
        torch.set_num_threads(n)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_table(rows, path_stem, columns):
    with open(path_stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    table = "\n".join(lines)
    with open(path_stem + ".md", "w") as f:
        f.write(table + "\n")
    print(table)


def bench_plain(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from knn_longllama import LongLlamaConfig, LongLlamaForCausalLM

    torch.manual_seed(0)
    hf_models = {}
    for impl in ("sdpa", "eager"):
        config = LlamaConfig(**PLAIN, rope_theta=10000.0)
        config._attn_implementation = impl
        hf_models[impl] = LlamaForCausalLM(config).eval()
    hf_models["eager"].load_state_dict(hf_models["sdpa"].state_dict())
    ours = {}
    for name, torch_attention in (("ours (matmul, official)", False), ("ours (sdpa)", True)):
        model = LongLlamaForCausalLM(LongLlamaConfig(**PLAIN, mem_layers=[], last_context_length=2048,
                                                     torch_attention=torch_attention)).eval()
        model.load_state_dict(hf_models["sdpa"].state_dict())
        ours[name] = model
    models = {"transformers (sdpa)": hf_models["sdpa"], "transformers (eager)": hf_models["eager"], **ours}

    prompt = torch.randint(3, 32000, (1, args.prefill_tokens))
    short = prompt[:, :64]
    rows = []
    with torch.no_grad():
        for name, model in models.items():
            prefill = median_seconds(lambda: model(prompt, logits_to_keep=1), args.repeats)
            decode = median_seconds(
                lambda: model.generate(short, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
                                       do_sample=False, pad_token_id=0),
                max(1, args.repeats // 2),
            )
            rows.append({"model": name, "prefill_tok_s": args.prefill_tokens / prefill,
                         "decode_tok_s": args.decode_tokens / decode})
    base = rows[0]
    for row in rows:
        row["prefill_vs_hf_sdpa"] = row["prefill_tok_s"] / base["prefill_tok_s"]
        row["decode_vs_hf_sdpa"] = row["decode_tok_s"] / base["decode_tok_s"]
    print(f"\nPlain path: {PLAIN}, prefill {args.prefill_tokens} tokens, decode {args.decode_tokens} tokens, "
          f"threads {args.threads}, medians of {args.repeats}")
    write_table(rows, os.path.join(RESULTS, "bench_forward_plain"),
                ["model", "prefill_tok_s", "decode_tok_s", "prefill_vs_hf_sdpa", "decode_vs_hf_sdpa"])


ATTENTION = {"matmul (official)": False, "sdpa": True}  # label -> torch_attention


def ingest_once(num_tokens: int, threads: int, torch_attention: bool) -> dict:
    """Runs in a subprocess: ingest `num_tokens` into dense memory, report seconds and peak RSS."""
    import resource

    from knn_longllama import LongLlamaConfig, LongLlamaForCausalLM

    set_threads(threads)
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(LongLlamaConfig(**INGEST, torch_attention=torch_attention)).eval()
    ids = torch.randint(3, 32000, (1, num_tokens))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    memory_mb = sum(m.nbytes() for m in out.cache.memories.values()) / 2**20
    return {"tokens": num_tokens, "seconds": seconds, "tokens_per_s": num_tokens / seconds, "peak_rss_mb": peak_mb,
            "rss_before_mb": rss_before / 1024, "memory_mb": memory_mb}


def bench_ingest(args):
    rows = []
    for n in args.ingest_tokens:
        for label, torch_attention in ATTENTION.items():
            proc = subprocess.run([sys.executable, __file__, "--ingest-child", str(n), "--threads", str(args.threads)]
                                  + (["--sdpa"] if torch_attention else []), capture_output=True, text=True, check=True)
            rows.append({"attention": label, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(f"  {label}: ingested {n} tokens in {rows[-1]['seconds']:.1f}s", flush=True)
        rows[-1]["official_over_sdpa"] = rows[-2]["seconds"] / rows[-1]["seconds"]
        rows[-2]["official_over_sdpa"] = 1.0
    print(f"\nDense-memory ingestion: {INGEST}, threads {args.threads}")
    write_table(rows, os.path.join(RESULTS, "bench_forward_ingest"),
                ["attention", "tokens", "seconds", "tokens_per_s", "official_over_sdpa", "peak_rss_mb", "memory_mb"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for label in ATTENTION:
            mine = [r for r in rows if r["attention"] == label]
            ax1.loglog([r["tokens"] for r in mine], [r["seconds"] for r in mine], "o-", label=label)
            ax2.plot([r["tokens"] for r in mine], [r["peak_rss_mb"] for r in mine], "o-", label=label)
        ax1.set(xlabel="context tokens", ylabel="ingestion time (s)", title="Dense memory: ingestion time")
        ax2.set(xlabel="context tokens", ylabel="peak RSS (MB)", title="Dense memory: peak RAM")
        ax1.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "bench_forward_ingest.png"), dpi=100)
    except ImportError:
        print("matplotlib not installed: no PNG")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch and Faiss OpenMP threads")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--ingest-tokens", type=int, nargs="+", default=None,
                        help="dense-memory ingestion lengths (default 8192 16384 32768 65536; --quick: 8192 16384)")
    parser.add_argument("--ingest-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sdpa", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ingest_child:
        print(json.dumps(ingest_once(args.ingest_child, args.threads, args.sdpa)))
        return
    set_threads(args.threads)
    args.repeats = 3 if args.quick else 7
    args.prefill_tokens = 512 if args.quick else 1024
    args.decode_tokens = 16 if args.quick else 64
    args.ingest_tokens = args.ingest_tokens or ([8192, 16384] if args.quick else [8192, 16384, 32768, 65536])
    os.makedirs(RESULTS, exist_ok=True)
    if not args.skip_plain:
        bench_plain(args)
    if not args.skip_ingest:
        bench_ingest(args)


if __name__ == "__main__":
    main()
