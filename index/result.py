"""Search results: exact re-scoring of candidate ids and value gathering."""

from dataclasses import dataclass

import torch


@dataclass
class SearchResult:
    """Neighbours of each query, ordered by exact score, best first.

    ids:    int64 [B, H, Q, K], positions in the row's storage; -1 = no neighbour.
    scores: float32 [B, H, Q, K], exact float32 <q, key>; -inf where ids == -1.
    values: [B, H, Q, K, d] stored values (store dtype); zeros where ids == -1.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    values: torch.Tensor

    @property
    def k(self) -> int:
        return self.ids.shape[-1]


def empty_result(B: int, H: int, Q: int, d: int, dtype: torch.dtype, device) -> SearchResult:
    """A result with K = 0 neighbours (empty store)."""
    return SearchResult(
        ids=torch.empty(B, H, Q, 0, dtype=torch.int64, device=device),
        scores=torch.empty(B, H, Q, 0, dtype=torch.float32, device=device),
        values=torch.empty(B, H, Q, 0, d, dtype=dtype, device=device),
    )


def rescore(queries: torch.Tensor, ids: torch.Tensor, storage, heads: list[int], k: int) -> SearchResult:
    """Recompute exact scores of candidate ``ids``, keep the ``k`` best, gather their values.

    queries: float32 [B, h, Q, d] for storage heads ``heads`` (h of them);
    ids: int64 [B, h, Q, K >= k] (-1 = none); storage: a RowStorage or DiskStorage, whose ``take`` reads rows.
    Scores are float32 dot products of the float32 query with the stored key
    cast to float32.
    """
    safe = ids.clamp_min(0)
    k_rows = storage.take("keys", safe, heads)
    scores = torch.einsum("bhqkd,bhqd->bhqk", k_rows.float(), queries)
    del k_rows
    missing = ids.device.type != "cpu" or bool((ids < 0).any())  # skip masking work on CPU when possible
    if missing:
        scores.masked_fill_(ids < 0, float("-inf"))
    scores, order = scores.sort(dim=-1, descending=True, stable=True)
    scores, order = scores[..., :k], order[..., :k]
    ids, safe = ids.gather(-1, order), safe.gather(-1, order)
    v_rows = storage.take("values", safe, heads)
    if missing:
        v_rows.masked_fill_((ids < 0).unsqueeze(-1), 0)
    return SearchResult(ids=ids, scores=scores, values=v_rows)
