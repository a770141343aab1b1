"""Exact inner-product top-k in plain torch (any device), batched over rows."""

import torch

# Key chunk size bounds: float32 elements of one score block (rows x queries x
# keys), of one float32 key block (rows x keys x d: cache-sized, so casting a
# bf16 chunk and multiplying it stay in cache), and a floor on keys per chunk
# that keeps the per-chunk overhead small.
MAX_SCORE_BLOCK = 1 << 22
MAX_KEY_BLOCK = 1 << 20
MIN_CHUNK = 512
# On a GPU both blocks are this many times larger: a kernel launch per chunk costs more than cache misses do.
GPU_BLOCK_FACTOR = 1 << 6


def exact_topk(queries: torch.Tensor, keys: torch.Tensor, sizes: list[int], k: int) -> torch.Tensor:
    """Ids of the ``k`` largest <q, key> per query (in no particular order), -1 where a row has fewer keys.

    queries: float32 [B, H, Q, d]; keys: [B, H, N, d] (any float dtype and
    strides, cast to float32 chunk by chunk); sizes: B ints (row b uses
    keys[b, :, :sizes[b]]). Returns int64 [B, H, Q, k]. Keys are processed in
    chunks so memory stays bounded for large N.
    """
    B, H, Q, d = queries.shape
    n = max(sizes, default=0)
    ids = torch.full((B, H, Q, k), -1, dtype=torch.int64, device=queries.device)
    if n == 0 or k == 0 or Q == 0:
        return ids
    uniform = min(sizes) == n
    sizes = torch.tensor(sizes, device=queries.device).view(B, 1, 1, 1)
    R = B * H
    scale = GPU_BLOCK_FACTOR if queries.device.type == "cuda" else 1
    chunk = max(k, MIN_CHUNK, min(scale * MAX_SCORE_BLOCK // max(1, R * Q), scale * MAX_KEY_BLOCK // max(1, R * d)))
    best_s = best_i = None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s = torch.matmul(queries, keys[:, :, start:stop].float().transpose(-1, -2))  # [B, H, Q, c]
        if not uniform:
            s.masked_fill_(torch.arange(start, stop, device=s.device) >= sizes, float("-inf"))
        top_s, top_i = s.topk(min(k, stop - start), dim=-1, sorted=False)
        top_i += start
        if best_s is not None:
            top_s, j = torch.cat([best_s, top_s], -1).topk(min(k, stop), dim=-1, sorted=False)
            top_i = torch.cat([best_i, top_i], -1).gather(-1, j)
        best_s, best_i = top_s, top_i
    best_i = best_i.masked_fill(best_s == float("-inf"), -1)
    ids[..., : best_i.shape[-1]] = best_i
    return ids
