"""Growable key/value tensors [B, H, capacity, d] with independent row sizes."""

import torch

MIN_CAPACITY = 256


class RowStorage:
    """Append-only keys and values per batch row; capacity doubles when full.

    Position ``i`` of row ``b`` holds the i-th real token added to that row;
    it is the id under which the token is indexed.
    """

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.shape = (batch_size, num_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.reset()

    def reset(self) -> None:
        B, H, d = self.shape
        self.keys = torch.empty(B, H, 0, d, dtype=self.dtype, device=self.device)
        self.values = torch.empty_like(self.keys)
        self.sizes = [0] * B

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def disk_nbytes(self) -> int:
        return 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` tokens per row at once: the capacity is exact, so no growth (which holds the old
        and the new buffers together) happens up to there."""
        self._reserve(needed, exact=True)

    def _reserve(self, needed: int, exact: bool = False) -> None:
        if needed <= self.capacity:
            return
        new_cap = needed if exact else max(needed, 2 * self.capacity, MIN_CAPACITY)
        used = max(self.sizes)
        B, H, d = self.shape
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.zeros(B, H, new_cap, d, dtype=self.dtype, device=self.device)  # past a row's end: zeros
            new[:, :, :used] = old[:, :, :used]
            setattr(self, name, new)

    def append_all(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append [B, H, T, d] to every row (rows must have equal sizes)."""
        start, T = self.sizes[0], keys.shape[2]
        self._reserve(start + T)
        self.keys[:, :, start:start + T] = keys
        self.values[:, :, start:start + T] = values
        self.sizes = [start + T] * len(self.sizes)

    def append_row(self, b: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append [H, n, d] to row ``b``."""
        start, n = self.sizes[b], keys.shape[1]
        self._reserve(start + n)
        self.keys[b, :, start:start + n] = keys
        self.values[b, :, start:start + n] = values
        self.sizes[b] = start + n

    def append_rows(self, rows: list) -> None:
        """Append (keys, values) [H, n_b, d] (or None) to each row b."""
        for b, row in enumerate(rows):
            if row is not None:
                self.append_row(b, *row)

    def entries(self, heads, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, h, n, d] of ``heads`` (views; zeros past a shorter row's end)."""
        return self.keys[:, heads, :n], self.values[:, heads, :n]

    def scan_keys(self, rows: list[int], heads, n: int) -> torch.Tensor:
        """Keys [len(rows), h, n, d] of ``rows`` and ``heads`` for ``exact_topk`` (a view when all rows are taken
        and ``heads`` is a slice)."""
        keys = self.keys[:, heads, :n]
        return keys if len(rows) == self.shape[0] else keys[rows]

    def take(self, name: str, ids: torch.Tensor, heads: list[int]) -> torch.Tensor:
        """Rows of ``name`` ("keys" or "values") at ids [B, h, Q, K] (>= 0) of storage heads ``heads``:
        [B, h, Q, K, d], by one index_select over the flattened storage."""
        t = getattr(self, name)
        B, H, C, d = t.shape
        rows = torch.arange(B, device=ids.device).view(B, 1) * H
        offsets = (rows + torch.tensor(heads, device=ids.device).view(1, -1)).view(B, -1, 1, 1) * C
        return t.view(B * H * C, d).index_select(0, (ids + offsets).view(-1)).view(*ids.shape, d)

    def float_keys(self, b: int, start: int, stop: int):
        """Stored keys of row ``b``, positions [start, stop), as float32 numpy [H, n, d]."""
        return self.keys[b, :, start:stop].to("cpu", torch.float32).contiguous().numpy()
