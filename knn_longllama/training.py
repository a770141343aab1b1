"""Focused Transformer (FoT) cross-batch training in PyTorch (docs/semantics.md, "FoT cross-batch training").

A training batch holds `streams_per_batch` document streams, each as `chunks_per_stream` (k) consecutive rows of
`chunk_len` tokens: rows k*n .. k*n+k-1 are chunks 0..k-1 of stream n. The model is called with
`crossbatch_contexts=E`, so in every memory layer row b attends, with gradients and one fp32 softmax, to its own
causal chunk plus the un-rotated keys/values of rows b-1 .. b-E. Earlier chunks of the same stream are positives;
chunks of other streams (reached once E >= k, or by the first rows of a stream) are negatives. The loss is the plain
next-token cross-entropy, optionally weighted per token (`loss_weights`, e.g. to stress answer tokens).

Typical use::

    config = TrainingConfig(max_steps=1000, lr=1e-3, chunks_per_stream=4, output_dir="ckpt")
    batches = pack_crossbatch(streams, chunk_len=128, chunks_per_stream=4, streams_per_batch=4)
    history = train(model, batches, config, tokenizer=tokenizer)

`model` may be a freshly initialised `LongLlamaForCausalLM(LongLlamaConfig(...))` (training from scratch) or one
loaded with `LongLlamaForCausalLM.from_pretrained(...)` (continued pretraining).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------- data


def _as_stream(stream) -> tuple[list[int], list[float] | None]:
    """A stream is a sequence of token ids, or a dict with `input_ids` and optional per-token `loss_weights`."""
    if isinstance(stream, dict):
        ids = [int(t) for t in stream["input_ids"]]
        weights = stream.get("loss_weights")
        weights = None if weights is None else [float(w) for w in weights]
        if weights is not None and len(weights) != len(ids):
            raise ValueError(f"`loss_weights` has {len(weights)} entries but `input_ids` has {len(ids)}.")
        return ids, weights
    return [int(t) for t in stream], None


def pack_crossbatch(
    streams: Iterable,
    chunk_len: int,
    chunks_per_stream: int,
    streams_per_batch: int,
    pad_token_id: int = 0,
    drop_last: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Pack document streams into FoT cross-batch batches.

    Each stream (a sequence of token ids, or a dict with `input_ids` and optional `loss_weights`) is cut into groups
    of `chunks_per_stream * chunk_len` consecutive tokens; the last, shorter group is right-padded (padding has
    `attention_mask` 0 and label -100). Every group becomes `chunks_per_stream` consecutive rows of one batch, and a
    batch holds `streams_per_batch` groups in the order they arrive, so rows `k*n .. k*n+k-1` are the k consecutive
    chunks of the n-th group.

    Yields dicts with `input_ids`, `attention_mask`, `labels` (all `[streams_per_batch * k, chunk_len]`, long) and,
    if any stream carries `loss_weights`, a float `loss_weights` of the same shape (1.0 where not given, 0 on padding).
    A final incomplete batch is dropped unless `drop_last=False`.
    """
    if chunk_len <= 0 or chunks_per_stream <= 0 or streams_per_batch <= 0:
        raise ValueError("`chunk_len`, `chunks_per_stream` and `streams_per_batch` must be positive.")
    group_len = chunk_len * chunks_per_stream
    pending: list[tuple[list[int], list[float] | None, int]] = []

    def emit(groups):
        ids = torch.full((len(groups), group_len), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(groups), group_len), dtype=torch.long)
        weights = torch.zeros((len(groups), group_len), dtype=torch.float32)
        any_weights = False
        for g, (group_ids, group_weights, n) in enumerate(groups):
            ids[g, :n] = torch.tensor(group_ids, dtype=torch.long)
            mask[g, :n] = 1
            if group_weights is not None:
                any_weights = True
                weights[g, :n] = torch.tensor(group_weights, dtype=torch.float32)
            else:
                weights[g, :n] = 1.0
        shape = (len(groups) * chunks_per_stream, chunk_len)
        batch = {
            "input_ids": ids.view(shape),
            "attention_mask": mask.view(shape),
            "labels": ids.masked_fill(mask == 0, IGNORE_INDEX).view(shape),
        }
        if any_weights:
            batch["loss_weights"] = weights.view(shape)
        return batch

    for stream in streams:
        ids, weights = _as_stream(stream)
        for start in range(0, len(ids), group_len):
            group_ids = ids[start : start + group_len]
            group_weights = None if weights is None else weights[start : start + group_len]
            pending.append((group_ids, group_weights, len(group_ids)))
            if len(pending) == streams_per_batch:
                yield emit(pending)
                pending = []
    if pending and not drop_last:
        yield emit(pending)


def crossbatch_contexts_at(step: int, start: int, end: int, ramp_begin: int, ramp_end: int) -> int:
    """Number of extra contexts E at `step`: `start` until `ramp_begin`, then rising linearly (rounded down) to `end`
    at `ramp_end`, then `end`. The FoT advice: begin with few contexts (within one stream), then raise E so that
    more negatives (chunks of other streams) are seen."""
    if step <= ramp_begin or end == start:
        return start
    if step >= ramp_end:
        return end
    frac = (step - ramp_begin) / max(ramp_end - ramp_begin, 1)
    return int(start + math.floor(frac * (end - start)))


def lr_at(step: int, base_lr: float, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Linear warmup to `base_lr`, then constant or cosine decay to `min_lr_ratio * base_lr` at `max_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"`lr_schedule` must be 'constant' or 'cosine', got {schedule!r}.")
    progress = min(1.0, (step - warmup_steps) / max(max_steps - warmup_steps, 1))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------------- training


@dataclass
class TrainingConfig:
    """Hyper-parameters of `train` (defaults: the released LongLLaMA recipe where it applies, AdamW 0.9/0.95,
    clip 1.0, weight decay 0.01).

    chunks_per_stream: k, the rows per stream in the batches (used for the default context schedule).
    contexts_start / contexts_end: E at the beginning / end of the schedule; default k-1 (only the stream's own
    earlier chunks, for its last row) and 2k-1 (also the whole previous stream).
    contexts_ramp: (begin, end) as fractions of `max_steps` over which E rises linearly.
    """

    max_steps: int = 1000
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # or "constant"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    chunks_per_stream: int = 4
    contexts_start: int | None = None
    contexts_end: int | None = None
    contexts_ramp: tuple[float, float] = (0.3, 0.6)
    seed: int = 0
    num_threads: int | None = None
    log_every: int = 10
    save_every: int = 0  # 0: only at the end (when output_dir is set)
    max_seconds: float | None = None  # stop early after this much wall time (the lr schedule still uses max_steps)
    output_dir: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes about the run (not used by `train`)

    def contexts_at(self, step: int) -> int:
        k = self.chunks_per_stream
        start = k - 1 if self.contexts_start is None else self.contexts_start
        end = 2 * k - 1 if self.contexts_end is None else self.contexts_end
        begin, finish = (int(f * self.max_steps) for f in self.contexts_ramp)
        return crossbatch_contexts_at(step, start, end, begin, finish)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.warmup_steps, self.max_steps, self.lr_schedule, self.min_lr_ratio)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def crossbatch_loss(model, batch: dict[str, torch.Tensor], contexts: int) -> torch.Tensor:
    """Next-token loss of one packed batch with `contexts` extra cross-batch contexts (0: no memory at all, each row
    alone). Uses `loss_weights` if the batch has them (weighted mean over labelled tokens)."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    kwargs = dict(attention_mask=attention_mask, use_cache=False)
    if contexts > 0:
        kwargs["crossbatch_contexts"] = contexts
    else:  # one window per row and an empty memory: the memory layers see only their own chunk
        kwargs["last_context_length"] = input_ids.shape[1]
    weights = batch.get("loss_weights")
    if weights is None:
        return model(input_ids, labels=labels, **kwargs).loss
    logits = model(input_ids, **kwargs).logits
    targets = labels[:, 1:]
    token_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    w = weights[:, 1:].to(device).reshape(-1) * (targets.reshape(-1) != IGNORE_INDEX)
    return (token_loss * w).sum() / w.sum().clamp(min=1e-8)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)  # no decay on norms (and biases)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_checkpoint(model, output_dir: str, tokenizer=None) -> None:
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)


def train(model, batches: Iterable[dict[str, torch.Tensor]], config: TrainingConfig, tokenizer=None,
          callback=None) -> list[dict]:
    """FoT cross-batch training of `model` on packed `batches` (see `pack_crossbatch`) for `config.max_steps` steps.

    AdamW (betas, weight decay on matrices only), gradient clipping, warmup + constant/cosine lr, E from
    `config.contexts_at(step)`. Checkpoints (`model.save_pretrained` + tokenizer) go to `config.output_dir` every
    `save_every` steps and at the end. `callback(step, record)` is called after each logged step.
    Returns the history: one dict per step (step, loss, lr, contexts, grad_norm, seconds).
    """
    seed_everything(config.seed)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    optimizer = torch.optim.AdamW(
        _param_groups(model, config.weight_decay), lr=config.lr, betas=tuple(config.betas), eps=config.eps
    )
    model.train()
    history: list[dict] = []
    iterator = iter(batches)
    progress = None
    if config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.max_steps, desc="FoT training", dynamic_ncols=True)
    smoothed = None
    started = time.time()
    try:
        for step in range(config.max_steps):
            try:
                batch = next(iterator)
            except StopIteration:
                logger.warning("The batches ran out after %d steps.", step)
                break
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            contexts = config.contexts_at(step)
            loss = crossbatch_loss(model, batch, contexts)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Non-finite loss {loss.item()} at step {step}.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            value = loss.item()
            smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
            record = dict(step=step, loss=value, lr=lr, contexts=contexts, grad_norm=float(grad_norm),
                          seconds=time.time() - started)
            history.append(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{smoothed:.3f}", E=contexts, lr=f"{lr:.2e}")
            if config.log_every and (step % config.log_every == 0 or step == config.max_steps - 1):
                logger.info("step %d loss %.4f (smoothed %.4f) lr %.2e E %d grad %.2f %.0fs", step, value, smoothed,
                            lr, contexts, float(grad_norm), record["seconds"])
                if callback is not None:
                    callback(step, record)
            if config.output_dir and config.save_every and (step + 1) % config.save_every == 0:
                save_checkpoint(model, config.output_dir, tokenizer)
            if config.max_seconds is not None and time.time() - started > config.max_seconds:
                logger.info("Stopping after %d steps: the time budget of %.0fs is spent.", step + 1, config.max_seconds)
                break
    finally:
        if progress is not None:
            progress.close()
    model.eval()
    if config.output_dir:
        save_checkpoint(model, config.output_dir, tokenizer)
    return history


def evaluate_loss(model, batches: Iterable[dict[str, torch.Tensor]], contexts: int, max_batches: int | None = None
                  ) -> float:
    """Mean `crossbatch_loss` over `batches` (no gradients) with `contexts` extra contexts (0: no memory)."""
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in itertools.islice(batches, max_batches):
            losses.append(crossbatch_loss(model, batch, contexts).item())
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)


__all__ = [
    "TrainingConfig",
    "crossbatch_contexts_at",
    "crossbatch_loss",
    "evaluate_loss",
    "lr_at",
    "pack_crossbatch",
    "save_checkpoint",
    "train",
]
