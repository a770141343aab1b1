"""The model against an independent brute-force implementation of the LongLLaMA semantics (docs/semantics.md, "Windows" to "Eviction and generation").

The reference below is written from docs/semantics.md in plain torch with loops over rows, tokens and heads. It shares no
code with the package: its own RoPE, RMSNorm, window splitting, eviction and memory bookkeeping.
"""

import math

import pytest
import torch

from conftest import tiny_model


class ReferenceRow:
    """One document (batch row) fed token chunks by the rules of docs/semantics.md."""

    def __init__(self, model, mem_dtype):
        self.w = {k: v.detach().double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        self.cfg = model.config
        self.mem_dtype = mem_dtype
        self.memory = {layer: [] for layer in self.cfg.mem_layers}  # layer -> list of (k [Hkv, d], v [Hkv, d])
        self.local = []  # list of tokens: dict(pos, real, kv={layer: (k, v)})
        self.next_pos = 0

    # -- building blocks -------------------------------------------------------------------------------------
    def norm(self, x, name):
        return x / torch.sqrt((x * x).mean() + self.cfg.rms_norm_eps) * self.w[name]

    def rotate(self, x, pos):
        """Rotate pairs (i, i + d/2) by the angle pos * theta^(-2i/d)."""
        d = x.shape[-1]
        half = d // 2
        angle = pos * self.cfg.rope_theta ** (-2 * torch.arange(half, dtype=torch.float64) / d)
        c, s = torch.cos(angle), torch.sin(angle)
        return torch.cat([x[..., :half] * c - x[..., half:] * s, x[..., half:] * c + x[..., :half] * s], dim=-1)

    def memory_scores(self, layer, kv_head, q_raw, q_rot):
        """Raw scores and values [m], [m, d] of the memory entries one query head attends: every entry, its key
        un-rotated, scored with the query as rotated for the local keys (`q_rot`; `q_raw`: before rotation)."""
        keys = torch.stack([km[kv_head] for km, _ in self.memory[layer]])
        values = torch.stack([vm[kv_head] for _, vm in self.memory[layer]])
        return keys @ q_rot, values

    def to_memory(self, layer, k, v):
        cast = lambda t: t.to(self.mem_dtype).double()  # noqa: E731  stored in mem_dtype
        self.memory[layer].append((cast(k), cast(v)))

    # -- docs/semantics.md -------------------------------------------------------------------------------------
    def feed(self, tokens, real, use_cache, last_context_length):
        """Feed new tokens; returns their logits [N, V] (rows of padded tokens are left as NaN)."""
        cfg = self.cfg
        n = len(tokens)
        positions, count = [], 0
        for r in real:
            count += int(r)
            positions.append(self.next_pos + max(count - 1, 0))
        self.next_pos += count

        prefix = max(n - last_context_length, 0)
        bounds, start = [], 0
        while start < prefix:
            bounds.append((start, min(start + cfg.max_position_embeddings, prefix)))
            start += cfg.max_position_embeddings
        bounds.append((prefix, n))

        logits = torch.full((n, cfg.vocab_size), float("nan"), dtype=torch.float64)
        for w, (beg, end) in enumerate(bounds):
            local_mode = use_cache and (w == len(bounds) - 1 or len(self.local) > 0)
            if local_mode and self.local and len(self.local) + (end - beg) > cfg.max_position_embeddings:
                for tok in self.local:  # evict the whole local cache before attending
                    if tok["real"]:
                        for layer in cfg.mem_layers:
                            self.to_memory(layer, *tok["kv"][layer])
                self.local = []
            window = [dict(pos=positions[i], real=bool(real[i]), kv={}) for i in range(beg, end)]
            keys_tokens = (self.local if local_mode else []) + window
            out = self.run_window(tokens[beg:end], window, keys_tokens)
            logits[beg:end] = out
            if local_mode:
                self.local = keys_tokens
            else:
                for tok in window:
                    if tok["real"]:
                        for layer in cfg.mem_layers:
                            self.to_memory(layer, *tok["kv"][layer])
        return logits

    def run_window(self, ids, window, keys_tokens):
        cfg, w = self.cfg, self.w
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        n_past = len(keys_tokens) - len(window)
        min_pos = min(tok["pos"] for tok in keys_tokens)
        x = torch.stack([w["model.embed_tokens.weight"][int(t)] for t in ids])
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}."
            is_mem = layer in cfg.mem_layers
            use_rope = not is_mem or cfg.mem_positionals
            h = torch.stack([self.norm(row, p + "input_layernorm.weight") for row in x])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(len(window), heads, d)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(len(window), kv_heads, d)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(len(window), kv_heads, d)
            for i, tok in enumerate(window):
                tok["kv"][layer] = (k[i], v[i])
            local_keys = [tok["kv"][layer][0] for tok in keys_tokens]
            if use_rope:
                local_keys = [self.rotate(kj, tok["pos"] - min_pos) for kj, tok in zip(local_keys, keys_tokens)]
            attn = torch.zeros(len(window), heads, d, dtype=torch.float64)
            for t in range(len(window)):
                if not window[t]["real"]:
                    continue
                qt = self.rotate(q[t], window[t]["pos"] - min_pos) if use_rope else q[t]
                # causal over the local keys, padding skipped; then the memory entries (`memory_scores`)
                visible = [j for j in range(n_past + t + 1) if keys_tokens[j]["real"]]
                keys = torch.stack([local_keys[j] for j in visible])  # [n, Hkv, d]
                values = torch.stack([keys_tokens[j]["kv"][layer][1] for j in visible])
                for hq in range(heads):
                    hk = hq // (heads // kv_heads)
                    scores, vals = keys[:, hk] @ qt[hq], values[:, hk]
                    if is_mem and self.memory[layer]:
                        mem_scores, mem_values = self.memory_scores(layer, hk, q[t, hq], qt[hq])
                        scores, vals = torch.cat([scores, mem_scores]), torch.cat([vals, mem_values])
                    probs = torch.softmax(scores / math.sqrt(d), dim=0)
                    attn[t, hq] = probs @ vals
            x = x + attn.view(len(window), heads * d) @ w[p + "self_attn.o_proj.weight"].T
            h = torch.stack([self.norm(row, p + "post_attention_layernorm.weight") for row in x])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            x = x + ((gate * torch.sigmoid(gate)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        h = torch.stack([self.norm(row, "model.norm.weight") for row in x])
        out = h @ w["lm_head.weight"].T
        for i, tok in enumerate(window):
            if not tok["real"]:
                out[i] = float("nan")
        return out


def reference_batch(model, ids, mask, use_cache, last_context_length, mem_dtype):
    rows = [ReferenceRow(model, mem_dtype) for _ in range(ids.shape[0])]
    logits = torch.stack([row.feed(ids[b].tolist(), mask[b].tolist(), use_cache, last_context_length)
                          for b, row in enumerate(rows)])
    return logits, rows


def assert_close_on_real(actual, expected, mask, tol):
    real = mask.bool()
    diff = (actual.double()[real] - expected[real]).abs().max().item()
    assert diff <= tol, f"max abs diff {diff} > {tol}"


def left_padded_batch(n_tokens, pad, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, n_tokens), generator=g)
    mask = torch.ones(2, n_tokens, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize(
    "last_context_length, mem_dtype, use_cache, torch_attention",
    [(3, "float32", False, False), (8, "float32", True, False), (16, "float32", False, False),
     (8, "bfloat16", False, False), (3, "bfloat16", True, False),
     (3, "float32", False, True), (8, "bfloat16", True, True)],  # fused SDPA over [local ; dense memory]
)
def test_forward_matches_reference_over_many_windows(last_context_length, mem_dtype, use_cache, torch_attention):
    model = tiny_model(mem_layers=[1], mem_dtype=mem_dtype, num_key_value_heads=2, attn_implementation="sdpa" if torch_attention else "eager")
    ids, mask = left_padded_batch(70, pad=5, vocab=model.config.vocab_size)  # >= 4 windows of 16
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=use_cache, last_context_length=last_context_length)
    expected, _ = reference_batch(model, ids, mask, use_cache, last_context_length, getattr(torch, mem_dtype))
    assert_close_on_real(out.logits, expected, mask, 1e-4)


@pytest.mark.parametrize("positionals", [True, False])
def test_two_memory_layers_and_positionals_flag(positionals):
    model = tiny_model(mem_layers=[0, 2], mem_positionals=positionals)
    ids, mask = left_padded_batch(50, pad=3, vocab=model.config.vocab_size, seed=1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=False)
    expected, _ = reference_batch(model, ids, mask, False, 8, torch.float32)
    assert_close_on_real(out.logits, expected, mask, 1e-4)


@pytest.mark.parametrize("torch_attention", [False, True])
def test_cache_path_with_evictions_matches_reference(torch_attention):
    """Prompt into memory + local cache, then chunks and single tokens that overflow the local cache."""
    model = tiny_model(mem_layers=[1], num_key_value_heads=2, attn_implementation="sdpa" if torch_attention else "eager")
    ids, mask = left_padded_batch(60, pad=4, vocab=model.config.vocab_size, seed=2)
    rows = [ReferenceRow(model, torch.float32) for _ in range(2)]
    feeds = [(0, 37), (37, 38), (38, 43), *[(i, i + 1) for i in range(43, 60)]]
    cache = None
    evictions = 0
    for beg, end in feeds:
        before = cache.local_length if cache is not None else 0
        with torch.no_grad():
            out = model(ids[:, beg:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
        cache = out.cache
        evictions += int(cache.local_length < before + (end - beg))
        expected = torch.stack([row.feed(ids[b, beg:end].tolist(), mask[b, beg:end].tolist(), True, 8)
                                for b, row in enumerate(rows)])
        assert_close_on_real(out.logits, expected, mask[:, beg:end], 1e-4)
    assert evictions >= 2
    stored_real = cache.memories[1].mask.view().sum(dim=-1).flatten().tolist()
    assert stored_real == [len(row.memory[1]) for row in rows]


def test_attention_grouping_changes_nothing():
    ids, mask = left_padded_batch(50, pad=3, vocab=61, seed=3)
    plain = tiny_model(mem_layers=[1], num_key_value_heads=2)
    grouped = tiny_model(mem_layers=[1], num_key_value_heads=2, mem_attention_grouping=(2, 3))
    with torch.no_grad():
        a = plain(ids, attention_mask=mask).logits
        b = grouped(ids, attention_mask=mask).logits
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=0)


def test_memory_really_changes_the_output():
    """Guards the reference test: with memory layers the logits differ from the memory-less model."""
    ids, mask = left_padded_batch(50, pad=0, vocab=61, seed=4)
    with torch.no_grad():
        a = tiny_model(mem_layers=[1])(ids).logits
        b = tiny_model(mem_layers=[])(ids).logits
    assert (a[:, -8:] - b[:, -8:]).abs().max() > 1e-2
