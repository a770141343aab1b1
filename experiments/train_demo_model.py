"""Train the small demo LongLLaMA that ships inside the package (`knn_longllama/demo/`), from scratch, on CPU.

    python -m experiments.train_demo_model        # tokenizer + 2 training phases + evaluation + model card (~1 h)
    python -m experiments.train_demo_model --copy-steps 50 --steps 60 --out /tmp/demo_quick   # a quick smoke run

The shipped checkpoint is that run (window 64, written to --out) continued with a 256-token window (another hour):

    python -m experiments.train_demo_model --out /tmp/demo_stage1
    python -m experiments.train_demo_model --init-from /tmp/demo_stage1 --window 256 --last-context 128 \
        --streams-per-batch 2 --steps 2400 --stop-after 1627

Steps:
1. A sentencepiece unigram tokenizer (vocab 1024, split digits, byte fallback) trained on the shipped Austen excerpt
   plus the synthetic task text, exported as a `tokenizers` tokenizer (tokenizer.json) loadable offline by
   `transformers.AutoTokenizer`; the sentencepiece `tokenizer.model` is shipped beside it.
2. Phase 1 (`--copy-steps`): copying without memory, rows of one window each holding a random segment repeated to
   the end of the row. This forms the induction heads that retrieval builds on.
3. Phase 2 (`--steps`): FoT cross-batch training (`knn_longllama.training.train`, E rising from k-1 to 2k-1 extra
   contexts) on streams of `chunks_per_stream * window` tokens (`pack_crossbatch`):
   - passkey prompts in the official format (docs/semantics.md, "Passkey evaluation"), plus variants with other fillers and wordings; the
     prompt sits at the end of a stream (after natural text), so the key is usually some chunks back;
   - key-value lookups: "The value of key 4821 is 7302." lines, queried at the end of the stream;
   - copying of digit groups and random pieces across chunks; natural text (the Jane Austen excerpt in
     experiments/data/). Answer tokens get a larger loss weight.
4. Passkey evaluation (`knn_longllama.passkey`) with dense memory, Faiss Flat k=32 and without memory layers, written
   to the model card.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import shutil
import sys
import time

import torch
from transformers import AutoTokenizer

from knn_longllama import LongLlamaConfig, LongLlamaForCausalLM
from knn_longllama.passkey import (
    FILLER, INFO_TEMPLATE, QUESTION, TASK_DESCRIPTION, chars_per_token, make_passkey_prompt, passkey_curve,
)
from knn_longllama.training import TrainingConfig, evaluate_loss, pack_crossbatch, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AUSTEN = os.path.join(ROOT, "experiments", "data", "austen_pride_and_prejudice_excerpt.txt")
DEMO_DIR = os.path.join(ROOT, "knn_longllama", "demo")

OTHER_FILLERS = [
    "The river is wide. The hills are far away. Birds sing in the morning. The road goes on and on.",
    "A cat sat on the mat. The door is open. It is a quiet day. Nothing happens here.",
    "The water is cold. The trees are tall. We walk and walk. The end is not near.",
]
OTHER_WORDINGS = [  # (info line template, question)
    ("The secret number is {key}. Keep it in mind. {key} is the secret number.",
     "What is the secret number? The secret number is"),
    ("The pass key is {key}. Remember it. {key} is the pass key.", "What is the pass key? The pass key is"),
    ("Remember this pass key: {key}. The pass key is {key}.", "Tell me the pass key. The pass key is"),
    ("The code is {key}. Do not forget it. {key} is the code.", "What is the code? The code is"),
]


# ------------------------------------------------------------------------------------------------------ tokenizer


def build_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 1024, seed: int = 0):
    """Train a sentencepiece unigram model and wrap the same vocabulary as a `tokenizers` tokenizer (LLaMA style:
    '▁' for spaces with a dummy prefix, byte fallback, BOS prepended). Saves tokenizer.model, tokenizer.json and
    tokenizer_config.json in `out_dir` and returns the transformers tokenizer."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "_tokenizer_corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(texts))
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="unigram", split_digits=True,
        byte_fallback=True, character_coverage=1.0, num_threads=2, max_sentence_length=100000,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, seed_sentencepiece_size=200000, minloglevel=2,
    )
    os.remove(corpus)
    os.remove(prefix + ".vocab")
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    vocab = []
    for i in range(sp.get_piece_size()):
        score = sp.get_score(i)
        if sp.is_byte(i):
            score = -1e6  # only as a fallback
        elif sp.is_control(i) or sp.is_unknown(i):
            score = 0.0
        vocab.append((sp.id_to_piece(i), score))
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        model_max_length=int(1e30),  # no length limit: documents of millions of tokens
    )
    for text in texts[:3]:  # same segmentation as sentencepiece
        sample = text[:5000]
        assert tokenizer(sample, add_special_tokens=False).input_ids == sp.encode(sample), "tokenizer mismatch"
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# ----------------------------------------------------------------------------------------------------------- data


def single_copy_line(info_template: str) -> str:
    """The key line stating the key once: its first sentence, then "Remember it." (official: "The pass key is
    {key}. Remember it."). With both copies in one window a model can answer by spotting the repeated digits; with
    one copy it has to retrieve the digits that follow "The pass key is" from memory."""
    return info_template.split(". ")[0].rstrip(".") + ". Remember it."


class DemoData:
    """Endless seeded streams of exactly `stream_len` tokens (dicts with input_ids and loss_weights)."""

    def __init__(self, tokenizer, austen_ids: list[int], stream_len: int, chunk_len: int, seed: int,
                 answer_weight: float = 5.0, short_passkeys: float = 0.0, straddle: float = 0.0,
                 single_copy: float = 0.0):
        self.tok = tokenizer
        self.austen = austen_ids
        self.stream_len = stream_len
        self.chunk_len = chunk_len
        self.rng = random.Random(seed)
        self.answer_weight = answer_weight
        self.short_passkeys = short_passkeys
        self.straddle = straddle
        self.single_copy = single_copy
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.cpt = {f: chars_per_token(tokenizer, f) for f in [FILLER] + OTHER_FILLERS}
        sentences = [s.strip().replace("\n", " ") + "." for s in open(AUSTEN, encoding="utf-8").read().split(".")]
        self.austen_sentences = [s for s in sentences if 30 <= len(s) <= 120]

    def natural(self, n: int) -> list[int]:
        if n <= 0:
            return []
        start = self.rng.randrange(0, len(self.austen) - n)
        return self.austen[start : start + n]

    def encode(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[float]]:
        """Token ids of `text` (with BOS) and weights: `answer_weight` on tokens overlapping a char span."""
        enc = self.tok(text, return_offsets_mapping=True)
        weights = []
        for tid, (a, b) in zip(enc.input_ids, enc.offset_mapping):
            hit = tid != self.bos and any(a < e and b > s for s, e in spans)
            weights.append(self.answer_weight if hit else 1.0)
        return list(enc.input_ids), weights

    def passkey_doc(self, max_tokens: int) -> tuple[str, list[tuple[int, int]]]:
        rng = self.rng
        kind = rng.random()
        filler, info, question, task = FILLER, INFO_TEMPLATE, QUESTION, TASK_DESCRIPTION
        if kind < 0.15:
            filler = rng.choice(OTHER_FILLERS)
        elif kind < 0.25:
            filler = " ".join(rng.sample(self.austen_sentences, 3))
        elif kind < 0.35:
            info, question = rng.choice(OTHER_WORDINGS)
        if self.single_copy and rng.random() < self.single_copy:
            info = single_copy_line(info)
        short = rng.random() < self.short_passkeys  # no task line, little filler: fits in one window (local copy)
        if short or rng.random() < 0.1:
            task = ""
        cpt = self.cpt.get(filler) or chars_per_token(self.tok, filler)
        target = rng.randint(24, self.chunk_len - 8) if short else rng.randint(min(48, max_tokens), max_tokens)
        for _ in range(5):
            fixed, _ = make_passkey_prompt(0, random.Random(0), key=12345, filler=filler, info_template=info,
                                           question=question, task=task)
            n_garbage = max(0, int((target - len(self.tok(fixed).input_ids) - 2) * cpt))
            prompt, key = make_passkey_prompt(n_garbage, rng, filler=filler, info_template=info, question=question,
                                              task=task)
            text = f"{prompt} {key}"
            if len(self.tok(text).input_ids) <= max_tokens:
                return text, [(len(prompt), len(text))]
            target = int(target * 0.9)
        return text, [(len(prompt), len(text))]

    def kv_doc(self, max_tokens: int) -> tuple[str, list[tuple[int, int]]]:
        rng = self.rng
        style = rng.random()
        lines, pairs = [], {}
        queries = rng.randint(2, 5)
        budget = max_tokens - 20 * queries
        while True:
            key = rng.randrange(1000, 10000)
            if key in pairs:
                continue
            value = rng.randrange(1, 10000)
            line = f"The value of key {key} is {value}." if style < 0.7 else f"key {key} -> value {value}"
            candidate = lines + [line]
            if rng.random() < 0.2:
                candidate.append(rng.choice(self.austen_sentences))
            if len(self.tok("\n".join(candidate)).input_ids) > budget and lines:
                break
            lines, pairs[key] = candidate, value
        text = "\n".join(lines)
        spans = []
        for key in rng.sample(list(pairs), min(queries, len(pairs))):
            if style < 0.7:
                text += f"\nWhat is the value of key {key}? The value of key {key} is"
            else:
                text += f"\nkey {key} -> value"
            start = len(text)
            text += f" {pairs[key]}"
            spans.append((start, len(text)))
            if style < 0.7:
                text += "."
        return text, spans

    def random_copy_stream(self, alphabet: int = 100) -> dict:
        """Pure copying: a random segment over a small alphabet repeated through the whole stream, no text."""
        rng, n = self.rng, self.stream_len
        length = rng.randint(6, 24)
        segment = [rng.randrange(259, 259 + alphabet) for _ in range(length)]
        ids = (segment * (n // length + 1))[:n]
        return dict(input_ids=ids, loss_weights=[1.0] * length + [self.answer_weight / 2] * (n - length))

    def copy_stream(self) -> dict:
        """Dense copying (the induction skill that retrieval builds on): after some natural text, a random segment
        (digit groups or random pieces) repeated until the end of the stream, so its repeats are both in the same
        window and some windows later. Every repeated token is weighted."""
        rng, n = self.rng, self.stream_len
        length = rng.randint(6, 40)
        if rng.random() < 0.5:
            digits = [self.tok.convert_tokens_to_ids(d) for d in "0123456789"]
            space = self.tok.convert_tokens_to_ids("\u2581")
            segment = [space if rng.random() < 0.2 else rng.choice(digits) for _ in range(length)]
        else:
            segment = [rng.randrange(259, self.tok.vocab_size) for _ in range(length)]
        head = rng.randint(0, self.chunk_len)
        body = (segment * (n // length + 2))[: n - head]
        ids = self.natural(head) + body
        weights = [1.0] * (head + length) + [self.answer_weight / 2] * (n - head - length)
        return dict(input_ids=ids, loss_weights=weights[:n])

    def sparse_copy_stream(self) -> dict:
        """Natural text with one random segment that occurs twice, the second time weighted (half of the repeats in
        the same window, half some windows later). Stream kind `copy1`; not used by the shipped model."""
        rng, n = self.rng, self.stream_len
        ids = self.natural(n)
        weights = [1.0] * n
        length = rng.randint(4, 24)
        segment = [rng.randrange(259, self.tok.vocab_size) for _ in range(length)]
        if rng.random() < 0.5:
            gap = rng.randint(0, self.chunk_len - 2 * length)
        else:
            gap = rng.randint(self.chunk_len, n - 2 * length - 1)
        first = rng.randint(0, n - 2 * length - gap)
        second = first + length + gap
        ids[first : first + length] = segment
        ids[second : second + length] = segment
        for i in range(second + 1, second + length):
            weights[i] = self.answer_weight
        return dict(input_ids=ids, loss_weights=weights)

    def memory_copy_stream(self, segments: int = 8) -> dict:
        """Copying out of memory only (stream kind `memcopy`): the first half of the stream is natural text with
        `segments` digit groups (4-10 digits) set into it; the second half repeats each group once, in shuffled
        order, between natural text; a repeat that would stand less than a chunk after its first occurrence (so
        possibly in the same window) is left out. Every repeated digit after the first is weighted: predicting it
        needs the digit that followed the same digit in memory (as for a key stated once, or the second copy of a
        passkey split from the first by a window boundary)."""
        rng, n, chunk = self.rng, self.stream_len, self.chunk_len
        digits = [self.tok.convert_tokens_to_ids(d) for d in "0123456789"]
        groups = [[rng.choice(digits) for _ in range(rng.randint(4, 10))] for _ in range(segments)]
        ids, weights = self.natural(n), [1.0] * n
        half = n // 2
        slots = sorted(rng.sample(range(0, half - 12, 12), segments))  # 12 tokens apart: groups never touch
        for start, group in zip(slots, groups):
            ids[start : start + len(group)] = group
        order = list(range(segments))
        rng.shuffle(order)
        later = sorted(rng.sample(range(half, n - 12, 12), segments))
        for start, i in zip(later, order):
            if start - slots[i] < chunk:  # too close: both copies could share a window
                continue
            group = groups[i]
            ids[start : start + len(group)] = group
            for j in range(start + 1, start + len(group)):
                weights[j] = self.answer_weight
        return dict(input_ids=ids, loss_weights=weights)

    def stream(self, kind: str) -> dict:
        """One stream of exactly `stream_len` tokens: natural text, then (for tasks) the task document ending
        somewhere in the last chunk, then natural text again."""
        n = self.stream_len
        if kind == "copy":
            return self.copy_stream()
        if kind == "rand100":
            return self.random_copy_stream(100)
        if kind == "copy1":
            return self.sparse_copy_stream()
        if kind == "memcopy":
            return self.memory_copy_stream()
        if kind == "text":
            ids = self.natural(n)
            return dict(input_ids=ids, loss_weights=[1.0] * n)
        tail = self.rng.randint(0, self.chunk_len // 2)
        make = self.passkey_doc if kind == "passkey" else self.kv_doc
        text, spans = make(n - tail - 1)
        ids, weights = self.encode(text, spans)
        ids, weights = ids + [self.eos], weights + [1.0]
        ids, weights = ids[: n - tail], weights[: n - tail]
        head = n - tail - len(ids)
        if kind == "passkey" and self.rng.random() < self.straddle:
            head, tail = self.straddled(ids, text, spans, head, tail)
        pre, post = self.natural(head), self.natural(tail)
        return dict(input_ids=pre + ids + post, loss_weights=[1.0] * head + weights + [1.0] * tail)

    def straddled(self, ids: list[int], text: str, spans: list[tuple[int, int]], head: int, tail: int):
        """(head, tail) that put the first copy of the key between 16 tokens before and 5 tokens after a chunk
        boundary, so that the key line is cut by a window boundary (the demo's main failure at inference)."""
        key = text[spans[0][0]:].strip()
        enc = self.tok(text, return_offsets_mapping=True)
        char = text.find(key)
        first = next((i for i, (a, b) in enumerate(enc.offset_mapping) if b > char), None)
        if first is None:
            return head, tail
        chunk, offset = self.chunk_len, self.rng.randint(-16, 5)
        options = [b * chunk + offset - first for b in range(1, self.stream_len // chunk + 1)]
        options = [h for h in options if 0 <= h <= head + tail]
        if not options:
            return head, tail
        new_head = self.rng.choice(options)
        return new_head, head + tail - new_head

    def streams(self, pattern: list[str]):
        while True:
            for kind in pattern:
                yield self.stream(kind)


# ------------------------------------------------------------------------------------------------------ model card


def _table(rows: list[dict], window: int) -> str:
    lines = ["| target tokens | x window | mean prompt tokens | accuracy | correct / trials |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target_tokens']} | {r['target_tokens'] / window:g} | {r['mean_prompt_tokens']:.0f} | "
                     f"{100 * r['accuracy']:.0f}% | {r['correct']} / {r['trials']} |")
    return "\n".join(lines)


EARLIER_SUMMARIES = "training_summaries_earlier.json"  # the summaries of the runs a continuation started from


def earlier_summaries(checkpoint_dir: str) -> list[dict]:
    """Training summaries of the runs that `checkpoint_dir` continued (--init-from), oldest first."""
    path = os.path.join(checkpoint_dir, EARLIER_SUMMARIES)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def write_model_card(out_dir: str) -> None:
    """MODEL_CARD.md from training_summary.json and passkey_results.json in `out_dir`."""
    with open(os.path.join(out_dir, "training_summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    results = {}
    if os.path.isfile(os.path.join(out_dir, "passkey_results.json")):
        with open(os.path.join(out_dir, "passkey_results.json")) as f:
            results = json.load(f)
    a = summary["args"]
    window = config["max_position_embeddings"]
    defaults = vars(build_parser().parse_args([]))
    earlier = earlier_summaries(out_dir) if a.get("init_from") else []  # the runs this one continues, oldest first
    stages = earlier + [summary]

    def command(args: dict, steps_run: int, stage: int) -> str:
        no_effect = {"out", "ckpt_dir", "save_every", "eval_lengths", "nomem_lengths", "trials"}  # weights unchanged
        args = dict(args)
        if args.get("max_minutes") is not None and steps_run < args["steps"]:  # stopped by time: same steps, anywhere
            args["max_minutes"], args["stop_after"] = None, steps_run
        if args.get("init_from"):
            args["init_from"] = f"/tmp/demo_stage{stage - 1}"
        parts = [f"--{key.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                 for key, v in args.items()
                 if key in defaults and v != defaults[key] and not isinstance(v, bool) and key not in no_effect]
        out = f" --out /tmp/demo_stage{stage}" if stage < len(stages) else ""
        return "python -m experiments.train_demo_model " + " ".join(parts) + out

    first = stages[0]  # the run that trained from scratch
    b = first["args"]
    b_window = b.get("window") or 64
    commands = "\n".join(command(s["args"], s["steps"] - (0 if i else s["args"].get("copy_steps", 0)), i + 1)
                         for i, s in enumerate(stages))
    later_stages = ""
    for i in range(1, len(stages)):
        s, prev = stages[i], stages[i - 1]
        sa = s["args"]
        stopped = (f"; stopped at step {s['steps']} by its time budget, reproduced with `--stop-after`"
                   if s["steps"] < sa["steps"] else "")
        e_start = sa["contexts_start"] if sa.get("contexts_start") is not None else sa["chunks"] - 1
        e_end = sa["contexts_end"] if sa.get("contexts_end") is not None else 2 * sa["chunks"] - 1
        prev_window = prev["args"].get("window") or 64
        changes = ([f"re-windowed: `max_position_embeddings` {prev_window} -> **{sa['window']}**, `last_context_length` "
                    f"{sa['last_context']}"] if sa["window"] != prev_window else [])
        prev_layers = next((st["args"]["mem_layers"] for st in reversed(stages[:i]) if st["args"].get("mem_layers")),
                           [2, 3])
        if sa.get("mem_layers") is not None and sa["mem_layers"] != prev_layers:
            changes.append(f"with memory layers {prev_layers} -> **{sa['mem_layers']}**")
        if sa.get("mem_positionals") is not None:
            changes.append(f"`mem_positionals` set to **{sa['mem_positionals']}**")
        pa = prev["args"]
        mix = ("the same stream mix" if (sa["pattern"], sa.get("single_copy", 0.0)) == (pa["pattern"], pa.get("single_copy", 0.0))
               else f"streams `{sa['pattern']}`" + (f" with the key stated once in {sa['single_copy']:.0%} of the passkey "
                                                    f"prompts" if sa.get("single_copy") else ""))
        later_stages += f"""- Stage {i + 1}, the stage {i} checkpoint{" " + " and ".join(changes) if changes else ""},
  then {s['steps']} more FoT steps on {mix} ({sa['streams_per_batch']} streams x {sa['chunks']} chunks of {sa['window']}
  tokens = {s['tokens_per_step']} tokens a step, E {e_start} -> {e_end}, lr {sa['lr']:g} with {sa['warmup']} warmup steps then {sa['lr_schedule']} planned over
  {sa['steps']} steps{stopped}), {s['train_seconds'] / 60:.1f} min with {sa['threads']} CPU thread(s).
"""
    minutes = sum(s["train_seconds"] for s in stages) / 60
    if len(stages) > 1:
        threads = sorted({s["args"]["threads"] for s in stages})
        parts = " + ".join(f"{s['train_seconds'] / 60:.1f}" for s in stages)
        time_line = (f"**{minutes:.1f} min** in all ({parts}) with "
                     f"{'/'.join(map(str, threads))} CPU thread(s) (see the notes below for the machine)")
    else:
        time_line = (f"**{minutes:.1f} min** for {summary['steps']} steps (both phases) with {a['threads']} CPU thread(s) "
                     f"(see the notes below for the machine)")
    sections = {
        "dense": "Dense memory (as trained, `load_demo()`)",
        "no_memory": "No memory layers (`load_demo(mem_layers=[])`): a plain LLaMA with the same weights",
        "faiss": "Faiss kNN memory (`load_demo(memory_spec=\"Flat k=32\")`)",
    }
    notes = ""
    if os.path.isfile(os.path.join(out_dir, "training_notes.md")):
        with open(os.path.join(out_dir, "training_notes.md")) as f:
            notes = "\n" + f.read()
    tables = "\n\n".join(f"**{sections.get(name, name)}**\n\n{_table(rows, window)}" for name, rows in results.items())
    text = f"""# knn_longllama demo model

A tiny LongLLaMA (Focused Transformer) trained from scratch on CPU with FoT cross-batch training and shipped inside
the package, so that the package has a real checkpoint with memory layers that loads offline in a second. It is a
toy: read the passkey results below before relying on it for anything.

```python
from knn_longllama.demo import load_demo
model, tokenizer = load_demo()                  # dense memory
model, tokenizer = load_demo(mem_layers=[])     # ablation: no memory layers
```

## Model

LLaMA architecture (`model_type: longllama`), {summary['parameters'] / 1e6:.2f}M parameters: hidden {config['hidden_size']},
{config['num_hidden_layers']} layers, {config['num_attention_heads']} heads (head dim {config['hidden_size'] // config['num_attention_heads']}), SwiGLU {config['intermediate_size']}, vocab {config['vocab_size']},
untied embeddings. Window (`max_position_embeddings`) **{window}** tokens, `last_context_length` {config['last_context_length']},
memory layer(s) `mem_layers={config['mem_layers']}`, `mem_dtype` {config['mem_dtype']}, RoPE theta {config['rope_theta']:g}{'' if config.get('mem_positionals', True) else ' (none in memory layers: `mem_positionals` false)'}. Weights in fp32
(`model.safetensors`).

Tokenizer: sentencepiece unigram, vocab {config['vocab_size']} (`split_digits`, `byte_fallback`, identity normalisation, dummy
prefix), trained on the training text; shipped as `tokenizer.model` and as an equivalent `tokenizers` file
(`tokenizer.json`, loaded with `transformers.AutoTokenizer`). BOS is prepended; pad = unk = 0, bos 1, eos 2.

## Training

Commands (from the repository root{"; one stage after the other" if len(stages) > 1 else ""}):

```
{commands}
```

- Phase 1 ({b.get('copy_steps', 0)} steps, lr {b.get('copy_lr', 0):g} constant): copying only, without memory: rows of one
  window, each a random segment (`{b.get('copy_pattern', '-')}`) repeated to the end of the row. This forms the induction
  heads that retrieval from memory builds on (mixed training from scratch never formed them on 2 CPU cores).
- Phase 2, FoT cross-batch training (`knn_longllama.training`): batches of {b['streams_per_batch']} streams x {b['chunks']} consecutive chunks of
  {b_window} tokens ({first['tokens_per_step']} tokens a step); in the memory layer each row attends to its own chunk plus
  the previous E rows of the batch with gradients. E rose from {b['chunks'] - 1} to {b['contexts_end'] if b['contexts_end'] is not None else 2 * b['chunks'] - 1} (linear over
  {b['contexts_ramp'][0]:g}..{b['contexts_ramp'][1]:g} of the planned steps), so late in training the first chunks also see the previous stream
  (negatives); {b['steps']} steps, lr {b['lr']:g} with {b['warmup']} warmup steps then {b['lr_schedule']}.
{later_stages}- AdamW (0.9, 0.95), weight decay 0.01 on matrices, clip 1.0, seed {b['seed']}.
- Streams, cycled `{b['pattern']}`:
  - *passkey*: a prompt in the exact official format (docs/semantics.md, "Passkey evaluation") in 65% of them, else with another filler
    (other repeated sentences or Austen sentences) or another wording ("secret number", "code", ...); the document
    (random length, up to the whole stream) ends in the last chunk, after Austen text, followed by EOS and more
    Austen, so the key line is usually one to three windows back;
  - *kv*: "The value of key 4821 is 7302." (or "key 4821 -> value 7302") lines with some Austen sentences between,
    then 2-5 queries of earlier keys;
  - *copy*: a random segment (digit groups or random pieces) repeated to the end of the stream after some Austen
    text (*copy1*: one segment that occurs twice);
  - *memcopy*: natural text with 8 digit groups (4-10 digits) in its first half, each repeated once in the second
    half at least a chunk later, every continuation digit weighted: copying out of memory only;
  - *text*: natural text, a {os.path.getsize(AUSTEN) // 1000} KB public-domain excerpt of Jane Austen's *Pride and Prejudice*
    (`experiments/data/`, first 95% for training).
  - Natural text also fills every task stream before and after its document.
  - Answer tokens (the key after the question, queried values) have loss weight {b['answer_weight']:g}, all others 1.
- Time: {time_line}.
- Final training loss (weighted, mean of the last logged steps): **{summary['final_loss']:.3f}**.
- Held-out loss on fresh passkey + kv streams (weighted): {summary['task_loss_with_memory']:.3f} with cross-batch memory
  of the stream's earlier chunks vs {summary['task_loss_without_memory']:.3f} without; Austen validation text (last 5% of the
  excerpt): {summary['austen_valid_loss_with_memory']:.3f} vs {summary['austen_valid_loss_without_memory']:.3f} nats/token.

## Passkey retrieval

`knn_longllama.passkey` (docs/semantics.md, "Passkey evaluation": official prompt, key uniform in [1, 50000), greedy generation of as many
tokens as the answer has, exact id match), 20 trials per length, seed 0. Prompt length in tokens is set through the
filler's characters per token; `x window` is the target length over the {window}-token training window.

{tables}

Reproduce: `knn-longllama passkey --memory dense --lengths 1024 4096 --trials 20` (add `--mem-layers` with no value for the
no-memory ablation).
{notes}"""
    with open(os.path.join(out_dir, "MODEL_CARD.md"), "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------------------ main


def passkey_point(job: tuple) -> dict:
    """Passkey accuracy of the checkpoint in `out_dir` with config overrides and a memory spec (None: no memory
    layers), at one length (one thread)."""
    from transformers import AutoTokenizer

    out_dir, overrides, memory, length, trials = job
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = LongLlamaForCausalLM.from_pretrained(out_dir, **overrides).eval()
    per_call = {} if memory is None else {"memory_spec": memory}
    row = passkey_curve(model, tokenizer, [length], trials=trials, seed=0, verbose=False, **per_call)[0]
    print(f"passkey {memory or 'no memory'}: {length:>7} tokens: {row['correct']}/{row['trials']} in "
          f"{row['seconds']:.0f}s", flush=True)
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEMO_DIR)
    parser.add_argument("--steps", type=int, default=8000, help="phase 2 steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="phase 2 peak lr (cosine)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=384)
    parser.add_argument("--mem-layers", type=int, nargs="*", default=None,
                        help="memory layers (default 2 3, or the --init-from checkpoint's; memory layers have no "
                             "parameters of their own, so a continuation may change them)")
    parser.add_argument("--window", type=int, default=None,
                        help="max_position_embeddings (default 64, or the --init-from checkpoint's)")
    parser.add_argument("--last-context", type=int, default=None,
                        help="last_context_length (default 32, or the --init-from checkpoint's)")
    parser.add_argument("--chunks", type=int, default=4, help="k: chunks (rows) per stream")
    parser.add_argument("--pattern", default="passkey,copy,passkey,kv",
                        help="stream kinds, cycled in this order: passkey, kv, copy, copy1, memcopy, rand100, text")
    parser.add_argument("--streams-per-batch", type=int, default=4)
    parser.add_argument("--ckpt-dir", default=None, help="intermediate checkpoints (every --save-every steps)")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop training after this wall time")
    parser.add_argument("--lr-schedule", default="cosine")
    parser.add_argument("--contexts-ramp", type=float, nargs=2, default=[0.1, 0.3])
    parser.add_argument("--contexts-end", type=int, default=None)
    parser.add_argument("--answer-weight", type=float, default=5.0)
    parser.add_argument("--short-passkeys", type=float, default=0.25, help="share of passkey prompts within one window")
    parser.add_argument("--single-copy", type=float, default=0.0,
                        help="share of passkey prompts whose key line states the key once")
    parser.add_argument("--straddle", type=float, default=0.0,
                        help="share of passkey streams whose key line is placed across a chunk boundary")
    parser.add_argument("--eval-lengths", type=int, nargs="*", default=[64, 128, 256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--nomem-lengths", type=int, nargs="*", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--eval-jobs", type=int, default=1, help="processes for the passkey evaluation (one thread each)")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--card-only", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--init-from", default=None, help="continue training this checkpoint instead of from scratch")
    parser.add_argument("--copy-steps", type=int, default=2500,
                        help="phase 1: steps of dense copying without cross-batch memory (forms induction heads)")
    parser.add_argument("--copy-lr", type=float, default=1e-3, help="constant lr of phase 1")
    parser.add_argument("--copy-pattern", default="rand100", help="streams of phase 1")
    parser.add_argument("--contexts-start", type=int, default=None, help="E at the start of phase 2 (default k-1)")
    parser.add_argument("--mem-positionals", choices=["true", "false"], default=None,
                        help="RoPE in memory layers (config `mem_positionals`; default true, or the --init-from "
                             "checkpoint's); false: queries and keys of memory layers are never rotated, so a match "
                             "learned on local keys is the same match on memory keys")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.card_only:
        write_model_card(args.out)
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.time()
    austen_text = open(AUSTEN, encoding="utf-8").read()
    split = int(len(austen_text) * 0.95)
    train_text, valid_text = austen_text[:split], austen_text[split:]

    if not args.eval_only:
        os.makedirs(args.out, exist_ok=True)
        task_samples = []
        sample_rng = random.Random(args.seed)
        for i in range(300):
            prompt, key = make_passkey_prompt(300, sample_rng)
            task_samples.append(f"{prompt} {key}")
            k, v = sample_rng.randrange(1000, 10000), sample_rng.randrange(1, 10000)
            task_samples.append(f"The value of key {k} is {v}. What is the value of key {k}? key {k} -> value {v}")
        for info, question in OTHER_WORDINGS:
            task_samples += [info.format(key=123) + " " + question] * 20
        task_samples += OTHER_FILLERS * 20
        if args.init_from:  # the checkpoint's own tokenizer: a new one (other seed, other samples) would not match
            tokenizer = AutoTokenizer.from_pretrained(args.init_from)
            tokenizer.save_pretrained(args.out)
            spm_model = os.path.join(args.init_from, "tokenizer.model")  # the sentencepiece file ships too
            if os.path.isfile(spm_model):
                shutil.copyfile(spm_model, os.path.join(args.out, "tokenizer.model"))
        else:
            tokenizer = build_tokenizer([train_text, "\n".join(task_samples)], args.out, seed=args.seed)
        austen_ids = tokenizer(train_text.replace("\n", " "), add_special_tokens=False).input_ids
        print(f"tokenizer: {len(tokenizer)} tokens; Austen train excerpt {len(austen_ids)} tokens; filler "
              f"{chars_per_token(tokenizer):.2f} chars/token", flush=True)

        if args.init_from:  # continued pretraining of an earlier checkpoint (same tokenizer), optionally re-windowed
            base_summary = os.path.join(args.init_from, "training_summary.json")
            if os.path.isfile(base_summary):  # the model card describes every stage
                with open(base_summary) as f:
                    chain = earlier_summaries(args.init_from) + [json.load(f)]
                with open(os.path.join(args.out, EARLIER_SUMMARIES), "w") as f:
                    json.dump(chain, f, indent=1)
            overrides = {} if args.mem_layers is None else {"mem_layers": list(args.mem_layers)}
            if args.mem_positionals is not None:  # memory layers have no parameters: both are free to change
                overrides["mem_positionals"] = args.mem_positionals == "true"
            model = LongLlamaForCausalLM.from_pretrained(args.init_from, **overrides)
            config = model.config
            config.max_position_embeddings = args.window = args.window or config.max_position_embeddings
            config.last_context_length = args.last_context = args.last_context or config.last_context_length
        else:
            args.window, args.last_context = args.window or 64, args.last_context or 32
            config = LongLlamaConfig(
                vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.ffn,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=args.window,
                last_context_length=args.last_context, mem_layers=[2, 3] if args.mem_layers is None else args.mem_layers, mem_dtype="float32",
                mem_positionals=args.mem_positionals != "false",
                rope_theta=10000.0, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False, initializer_range=0.02,
            )
            config.architectures = ["LongLlamaForCausalLM"]
            model = LongLlamaForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

        k = args.chunks
        history = []
        if args.copy_steps and not args.init_from:
            # Phase 1: the induction (copy) skill on its own, each row alone (E = 0); retrieval from memory uses
            # the same heads, and mixed from-scratch training never formed them on 2 CPU cores.
            # Streams of one window each (the same tokens a step), so every repeat is predictable within its row.
            copy_data = DemoData(tokenizer, austen_ids, args.window, args.window, seed=args.seed + 1,
                                 answer_weight=args.answer_weight)
            copy_batches = pack_crossbatch(copy_data.streams(args.copy_pattern.split(",")), args.window, 1,
                                           k * args.streams_per_batch, pad_token_id=0)
            copy_config = TrainingConfig(
                max_steps=args.copy_steps, lr=args.copy_lr, warmup_steps=args.warmup, lr_schedule="constant",
                contexts_start=0, contexts_end=0, weight_decay=0.01, chunks_per_stream=1, seed=args.seed,
                num_threads=args.threads, log_every=20, progress=False,
            )
            print(f"phase 1: {args.copy_steps} steps of {args.copy_pattern!r} streams without memory", flush=True)
            history += [dict(h, phase=1) for h in train(model, copy_batches, copy_config)]
            if args.ckpt_dir:  # reusable with --init-from (skips phase 1)
                model.save_pretrained(os.path.join(args.ckpt_dir, "phase1"))
                tokenizer.save_pretrained(os.path.join(args.ckpt_dir, "phase1"))
        print("phase 2: FoT cross-batch training", flush=True)
        data = DemoData(tokenizer, austen_ids, k * args.window, args.window, seed=args.seed,
                        answer_weight=args.answer_weight, short_passkeys=args.short_passkeys,
                        straddle=args.straddle, single_copy=args.single_copy)
        pattern = args.pattern.split(",")
        batches = pack_crossbatch(data.streams(pattern), args.window, k, args.streams_per_batch, pad_token_id=0)
        if args.stop_after:  # stop early (the lr and E schedules still follow --steps)
            batches = itertools.islice(batches, args.stop_after)
        tconfig = TrainingConfig(
            max_steps=args.steps, lr=args.lr, warmup_steps=args.warmup, lr_schedule=args.lr_schedule, min_lr_ratio=0.1,
            contexts_ramp=tuple(args.contexts_ramp), contexts_start=args.contexts_start,
            max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
            weight_decay=0.01, chunks_per_stream=k, contexts_end=args.contexts_end, seed=args.seed,
            num_threads=args.threads, log_every=20, output_dir=args.ckpt_dir, save_every=args.save_every, progress=False,
        )
        if args.steps > 0:
            history += [dict(h, phase=2) for h in train(model, batches, tconfig, tokenizer=tokenizer)]
        train_seconds = time.time() - started
        model.generation_config.pad_token_id = 0
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)

        # held-out losses: task batches with and without cross-batch memory, and Austen validation text
        eval_data = DemoData(tokenizer, austen_ids, k * args.window, args.window, seed=args.seed + 1000,
                             answer_weight=args.answer_weight)
        task_batches = list(itertools.islice(pack_crossbatch(eval_data.streams(["passkey", "kv"]), args.window, k, 2), 8))
        valid_ids = tokenizer(valid_text.replace("\n", " "), add_special_tokens=False).input_ids
        valid_batches = list(pack_crossbatch([valid_ids], args.window, k, 1))
        losses = {
            "task_loss_with_memory": evaluate_loss(model, task_batches, contexts=k - 1),
            "task_loss_without_memory": evaluate_loss(model, task_batches, contexts=0),
            "austen_valid_loss_with_memory": evaluate_loss(model, valid_batches, contexts=k - 1),
            "austen_valid_loss_without_memory": evaluate_loss(model, valid_batches, contexts=0),
        }
        summary = dict(
            args=vars(args), parameters=n_params, train_seconds=train_seconds,
            final_loss=sum(h["loss"] for h in history[-20:]) / max(len(history[-20:]), 1),
            tokens_per_step=args.streams_per_batch * k * args.window, steps=len(history), **losses,
            history=[{key: round(v, 5) if isinstance(v, float) else v for key, v in h.items()}
                     for h in history[:: max(1, len(history) // 100)]],
        )
        with open(os.path.join(args.out, "training_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(json.dumps({key: v for key, v in summary.items() if key != "history"}, indent=1), flush=True)

    # passkey evaluation: one (memory setting, length) curve point per job, `--eval-jobs` processes of one thread
    settings = {"dense": ({}, "dense"), "faiss": ({}, "Flat k=32"), "no_memory": ({"mem_layers": []}, None)}
    points = [(name, length) for name, lengths in [("dense", args.eval_lengths), ("faiss", args.eval_lengths),
                                                    ("no_memory", args.nomem_lengths)] for length in lengths]
    jobs = [(args.out, *settings[name], length, args.trials) for name, length in points]
    if args.eval_jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.eval_jobs) as pool:
            # longest first, so the pool does not end on one long job
            order = sorted(range(len(jobs)), key=lambda i: -jobs[i][3])
            rows = dict(zip(order, pool.map(passkey_point, [jobs[i] for i in order], chunksize=1)))
    else:
        rows = dict(enumerate(map(passkey_point, jobs)))
    results = {}
    for i, (name, length) in enumerate(points):
        results.setdefault(name, []).append(rows[i])
    with open(os.path.join(args.out, "passkey_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_model_card(args.out)
    print(f"total {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
