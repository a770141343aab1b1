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

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity, MIN_CAPACITY)
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

    def float_keys(self, b: int, start: int, stop: int):
        """Stored keys of row ``b``, positions [start, stop), as float32 numpy [H, n, d]."""
        return self.keys[b, :, start:stop].to("cpu", torch.float32).contiguous().numpy()
