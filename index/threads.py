"""One knob for the CPU threads used by torch and Faiss (OpenMP)."""

import faiss
import torch


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for both torch intra-op work and Faiss (OpenMP).

    torch and Faiss run one after the other on the search path, never
    concurrently, so giving both the same ``n`` (at most the number of physical
    cores) avoids oversubscription while keeping each fully parallel.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def get_num_threads() -> dict:
    """Current thread settings: {"torch": ..., "faiss": ...}."""
    return {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads()}
