"""The `knn-longllama` command line: passkey runs, reading documents into memory, asking them, generating.

    knn-longllama passkey                                 # demo model, dense vs Faiss Flat, 512..8192 tokens
    knn-longllama passkey --lengths 4096 65536 --index dense Flat IVF256,Flat HNSW32 --k 8 32
    knn-longllama read book.txt -o book.memory --index Flat --k 32
    knn-longllama ask book.memory "What is the pass key?" --index Flat --k 32
    knn-longllama generate "Once upon a time" --max-new-tokens 40
"""

import argparse
import json
import sys

import torch

INDEX_HELP = ("memory backend: 'dense' (official, attends to all memory), 'torch' (exact top-k in torch) or any "
              "Faiss index_factory string such as 'Flat', 'IVF1024,Flat', 'HNSW32', 'IVF1024,PQ16', 'SQ8'")


def memory_overrides(index: str, k: int | None, index_params: str | None, k_factor: int | None = None,
                     faiss_metric: str | None = None, torch_attention: bool = False,
                     faiss_search: str | None = None) -> dict:
    """Config fields for an --index / --k / --index-params / --k-factor / --faiss-metric / --torch-attention /
    --faiss-search choice."""
    overrides = {"torch_attention": True} if torch_attention else {}
    if index == "dense":
        overrides["mem_backend"] = "dense"
    elif index == "torch":
        overrides["mem_backend"] = "torch_topk"
    else:
        overrides.update(mem_backend="faiss", mem_index=index)
    if k is not None:
        overrides["mem_knn_k"] = k
    if index_params:
        params = {}
        for item in index_params.split(","):
            name, _, value = item.partition("=")
            if not value:
                raise SystemExit(f"--index-params: expected name=value[,name=value], got {index_params!r}")
            params[name.strip()] = int(value) if value.strip().isdigit() else float(value)
        overrides["mem_index_params"] = params
    if k_factor is not None:
        overrides["mem_knn_k_factor"] = k_factor
    if faiss_metric is not None:
        overrides["mem_faiss_metric"] = faiss_metric
    if faiss_search is not None:
        overrides["mem_faiss_search"] = faiss_search
    return overrides


def load_model(name: str | None, device: str, **overrides):
    """The embedded demo model (default), or an official LongLLaMA / Hugging Face LLaMA folder."""
    if name in (None, "demo"):
        from .demo import load_demo

        model, tokenizer = load_demo(**overrides)
    else:
        from transformers import AutoTokenizer

        from .modeling_longllama import LongLlamaForCausalLM

        model = LongLlamaForCausalLM.from_pretrained(name, **overrides)
        tokenizer = AutoTokenizer.from_pretrained(name)
    return model.to(device).eval(), tokenizer


def apply_memory_settings(model, overrides: dict) -> None:
    for key, value in overrides.items():
        setattr(model.config, key, value)
    model.config.validate_longllama()


def cmd_passkey(args) -> int:
    from .passkey import passkey_accuracy

    model, tokenizer = load_model(args.model, args.device)
    rows = []
    for index in args.index:
        ks = [None] if index == "dense" else args.k
        for k in ks:
            apply_memory_settings(model, memory_overrides(index, k, args.index_params, args.k_factor, args.faiss_metric,
                                                         args.torch_attention, faiss_search=args.faiss_search))
            for length in args.lengths:
                result = passkey_accuracy(model, tokenizer, length, trials=args.trials, seed=args.seed)
                row = {"index": index, "k": k if k is not None else "-", "tokens": length,
                       "mean_prompt_tokens": round(result["mean_prompt_tokens"]), "accuracy": result["accuracy"],
                       "correct": result["correct"], "trials": result["trials"],
                       "seconds": round(result["seconds"], 2)}
                rows.append(row)
                if not args.json:
                    print(f"{index:>14} k={str(row['k']):>4} {length:>8} tokens: accuracy {row['accuracy']:.2f} "
                          f"({row['correct']}/{row['trials']}) in {row['seconds']}s", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("\n| index | k | tokens | accuracy | seconds |\n|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['index']} | {row['k']} | {row['tokens']} | {row['accuracy']:.2f} | {row['seconds']} |")
    return 0


def cmd_read(args) -> int:
    model, tokenizer = load_model(args.model, args.device, **memory_overrides(
        args.index, args.k, args.index_params, args.k_factor, args.faiss_metric, args.torch_attention,
        faiss_search=args.faiss_search))
    doc = model.read(args.file, tokenizer, progress=not args.quiet)
    doc.save(args.output)
    print(f"read {doc.num_tokens} tokens into {args.output}")
    return 0


def cmd_ask(args) -> int:
    from .document import Document

    model, tokenizer = load_model(args.model, args.device, **memory_overrides(
        args.index, args.k, args.index_params, args.k_factor, args.faiss_metric, args.torch_attention,
        faiss_search=args.faiss_search))
    doc = Document.load(args.memory, model, tokenizer)
    for question in args.questions:
        answer = doc.ask(question, max_new_tokens=args.max_new_tokens, do_sample=False)
        print(answer if len(args.questions) == 1 else f"Q: {question}\nA: {answer}\n")
    return 0


def cmd_generate(args) -> int:
    model, tokenizer = load_model(args.model, args.device, **memory_overrides(
        args.index, args.k, args.index_params, args.k_factor, args.faiss_metric, args.torch_attention,
        faiss_search=args.faiss_search))
    prompt = open(args.file, encoding="utf-8").read() if args.file else args.prompt
    if prompt is None:
        raise SystemExit("generate: give a PROMPT or --file FILE")
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.sample else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             **sampling)
    print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knn-longllama",
        description="LongLLaMA with kNN (Faiss) memory: read documents of millions of tokens into memory, "
                    "ask them questions, and measure passkey retrieval.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None,
                        help="'demo' (default: the small model shipped in the package) or a checkpoint folder "
                             "(official LongLLaMA or Hugging Face LLaMA)")
    common.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda")
    common.add_argument("--threads", type=int, default=None,
                        help="threads for torch and Faiss together (default: their own defaults)")
    common.add_argument("--index-params", default=None, help="Faiss search parameters, e.g. nprobe=32 or efSearch=64")
    common.add_argument("--k-factor", type=int, default=None,
                        help="fetch k-factor x k candidates and keep the k best by exact score (for PQ/SQ indices)")
    common.add_argument("--faiss-metric", choices=["ip", "l2"], default=None,
                        help="ip: keys in an inner-product index (default); l2: norm-augmented keys in an L2 index "
                             "(higher recall for HNSW/IVF)")
    common.add_argument("--faiss-search", choices=["index", "big_batch"], default=None,
                        help="index: the Faiss index's own search (default); big_batch: IVF lists scanned once for "
                             "all queries of a window (faiss.contrib.big_batch_search; faster on large indices at a high "
                             "nprobe)")
    common.add_argument("--torch-attention", action="store_true",
                        help="fused SDPA instead of matmul + fp32 softmax in non-memory layers and, with --index dense, "
                             "in memory layers (faster reading; same math up to float rounding)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("passkey", parents=[common], help="passkey retrieval accuracy (spec section 4) per length")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192], help="prompt lengths in tokens")
    p.add_argument("--index", nargs="+", default=["dense", "Flat"], help=INDEX_HELP + " (several allowed)")
    p.add_argument("--k", type=int, nargs="+", default=[32], help="top-k values for the kNN indices")
    p.add_argument("--trials", type=int, default=10, help="prompts per length (fixed seeds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.set_defaults(func=cmd_passkey)

    for name, helptext in (("read", "read a text file into memory and save it"),
                           ("ask", "ask questions to a saved memory"),
                           ("generate", "generate a continuation of a prompt or file")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("--index", default="dense", help=INDEX_HELP)
        p.add_argument("--k", type=int, default=None, help="top-k for the kNN indices (default: the model's)")
        if name == "read":
            p.add_argument("file", help="UTF-8 text file")
            p.add_argument("-o", "--output", required=True, help="memory file to write (safetensors)")
            p.add_argument("--quiet", action="store_true", help="no progress bar")
            p.set_defaults(func=cmd_read)
        elif name == "ask":
            p.add_argument("memory", help="memory file written by `knn-longllama read`")
            p.add_argument("questions", nargs="+", help="one or more questions, each answered from the read state")
            p.add_argument("--max-new-tokens", type=int, default=32)
            p.set_defaults(func=cmd_ask)
        else:
            p.add_argument("prompt", nargs="?", default=None)
            p.add_argument("--file", default=None, help="read the prompt from this file")
            p.add_argument("--max-new-tokens", type=int, default=64)
            p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
            p.add_argument("--temperature", type=float, default=1.0)
            p.add_argument("--top-p", type=float, default=0.95)
            p.set_defaults(func=cmd_generate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import knn_index

        knn_index.set_num_threads(args.threads)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"knn-longllama {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
