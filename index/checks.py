"""Argument checks; every error names the offending argument."""

import numbers

import torch


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def float_tensor(name: str, x, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    return x


def shape(name: str, x: torch.Tensor, expected: dict) -> None:
    """``expected`` maps dim index -> (label, size)."""
    for dim, (label, size) in expected.items():
        if x.shape[dim] != size:
            raise ValueError(f"{name} has shape {tuple(x.shape)}: dim {dim} ({label}) must be {size}")


def finite(name: str, x: torch.Tensor) -> None:
    """One float64 reduction: a nan/inf anywhere makes the sum non-finite, and a
    float64 sum of finite float32/16 values cannot overflow."""
    fast = x.dtype != torch.float64 and x.device.type in ("cpu", "cuda")
    ok = torch.isfinite(x.sum(dtype=torch.float64)) if fast else torch.isfinite(x).all()
    if not bool(ok):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def mask(m, B: int, T: int, device) -> torch.Tensor | None:
    """Bool [B, T] (True = real token); integer 0/1 masks are accepted too."""
    if m is None:
        return None
    if not isinstance(m, torch.Tensor) or m.is_floating_point() or m.is_complex():
        raise ValueError(f"mask must be a bool (or integer 0/1) tensor of shape [{B}, {T}], got {m!r:.80}")
    if tuple(m.shape) != (B, T):
        raise ValueError(f"mask has shape {tuple(m.shape)}, expected [batch={B}, tokens={T}]")
    return m.to(device=device, dtype=torch.bool)


def k_value(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)
