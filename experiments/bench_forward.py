"""Forward-pass benchmark: our LongLLaMA vs transformers' LlamaForCausalLM, and dense-memory ingestion.

Part 1 (plain path): the same weights and inputs, within one window and without memory, side by side in one run:
prefill tokens/s and greedy decode tokens/s for transformers (sdpa, eager) and ours (matmul + fp32 softmax as the
official code, and fused SDPA with `torch_attention=True`), medians of torch.utils.benchmark.

Part 2 (dense memory): time and peak RAM to ingest N tokens into dense memory (8k..64k), with the official
matmul + fp32 softmax and with fused SDPA over [local ; memory] (`torch_attention=True`) side by side, each (N,
attention) in a fresh subprocess so that peak RSS is its own.

    python -m experiments.bench_forward            # full
    python -m experiments.bench_forward --quick    # a minute or two
    python -m experiments.bench_forward --skip-plain --ingest-tokens 8192 16384 32768   # dense ingestion only
Rows go to experiments/results/results.csv (bench_forward_plain, bench_forward_ingest).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from experiments import common

PLAIN = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048)
INGEST = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
              max_position_embeddings=512, last_context_length=256, mem_layers=[2, 4], mem_dtype="bfloat16")
ATTENTION = {"matmul (official)": False, "sdpa": True}  # label -> torch_attention


def bench_plain(args) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from knn_longllama import LongLlamaConfig, LongLlamaForCausalLM

    torch.manual_seed(0)
    hf = {}
    for impl in ("sdpa", "eager"):
        config = LlamaConfig(**PLAIN, rope_theta=10000.0)
        config._attn_implementation = impl
        hf[impl] = LlamaForCausalLM(config).eval()
    hf["eager"].load_state_dict(hf["sdpa"].state_dict())
    models = {"transformers (sdpa)": hf["sdpa"], "transformers (eager)": hf["eager"]}
    for name, torch_attention in (("ours (matmul, official)", False), ("ours (sdpa)", True)):
        models[name] = LongLlamaForCausalLM(LongLlamaConfig(**PLAIN, mem_layers=[], last_context_length=2048,
                                                            torch_attention=torch_attention)).eval()
        models[name].load_state_dict(hf["sdpa"].state_dict())
    prompt = torch.randint(3, 32000, (1, args.prefill_tokens))
    rows = []
    with torch.no_grad():
        for name, model in models.items():
            prefill, _ = common.median_seconds(lambda: model(prompt, logits_to_keep=1), args.seconds)
            decode, _ = common.median_seconds(lambda: model.generate(
                prompt[:, :64], max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False,
                pad_token_id=0), args.seconds)
            rows.append({"method": name, "prefill_tok_s": round(args.prefill_tokens / prefill, 2),
                         "decode_tok_s": round(args.decode_tokens / decode, 2)})
            print(rows[-1], flush=True)
    return rows


def ingest_once(num_tokens: int, torch_attention: bool) -> dict:
    """Runs in a subprocess: ingest `num_tokens` into dense memory, report seconds and peak RSS."""
    from knn_longllama import LongLlamaConfig, LongLlamaForCausalLM

    torch.manual_seed(0)
    model = LongLlamaForCausalLM(LongLlamaConfig(**INGEST, torch_attention=torch_attention)).eval()
    ids = torch.randint(3, 32000, (1, num_tokens))
    with torch.no_grad():
        out, seconds = common.timed(lambda: model(ids, use_cache=True, logits_to_keep=1))
    return {"seconds": round(seconds, 3), "peak_rss_mb": common.rss_mb(),
            "memory_mb": round(sum(m.nbytes() for m in out.cache.memories.values()) / 2**20, 2)}


def bench_ingest(args) -> list[dict]:
    rows = []
    for n in args.ingest_tokens:
        for label, torch_attention in ATTENTION.items():
            proc = subprocess.run([sys.executable, "-m", "experiments.bench_forward", "--ingest-child", str(n),
                                   "--threads", str(args.threads)] + (["--sdpa"] if torch_attention else []),
                                  capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
            rows.append({"method": label, "tokens": n, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, shorter measurements")
    parser.add_argument("--threads", type=int, default=2, help="torch and Faiss OpenMP threads")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--ingest-tokens", type=int, nargs="+", default=None,
                        help="dense-memory ingestion lengths (default 8192 16384 32768 65536; --quick: 8192 16384)")
    parser.add_argument("--run", default=None, help="the run's label (default: its start time)")
    parser.add_argument("--ingest-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sdpa", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import knn_index

    knn_index.set_num_threads(args.threads)
    if args.ingest_child:
        print(json.dumps(ingest_once(args.ingest_child, args.sdpa)))
        return
    args.seconds = 1.0 if args.quick else 5.0
    args.prefill_tokens = 512 if args.quick else 1024
    args.decode_tokens = 16 if args.quick else 64
    args.ingest_tokens = args.ingest_tokens or ([8192, 16384] if args.quick else [8192, 16384, 32768, 65536])
    run, env = common.run_id(args.run), common.environment("cpu", args.threads)
    if not args.skip_plain:
        common.append_rows("bench_forward_plain", bench_plain(args), ["prefill_tok_s", "decode_tok_s"], run, env)
    if not args.skip_ingest:
        common.append_rows("bench_forward_ingest", bench_ingest(args), ["seconds", "peak_rss_mb", "memory_mb"], run,
                           env)


if __name__ == "__main__":
    main()
