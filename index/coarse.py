"""The coarse step of a row's IVF indexes in torch, batched over heads: one matrix product and one top-k per call.

``IndexIVF.search`` and ``IndexIVF.add`` each run their own coarse quantizer (a flat search over the nlist centroids)
for one head at a time. ``Coarse`` assigns the queries or keys of every head of a row at once from the centroids
(copied out of the trained quantizers), then Faiss scans only the chosen lists (``search_preassigned``) or fills
them (``add_core``). The assignment is what the quantizer computes, up to float rounding on near ties.
"""

import faiss
import numpy as np
import torch

# float32 elements of one block of scores (heads x vectors x nlist), so assigning many keys stays bounded in memory.
MAX_SCORE_BLOCK = 1 << 22


def preassignable(index: faiss.Index) -> bool:
    """Whether ``index`` is a CPU IVF index (Flat, SQ or PQ codes) whose coarse quantizer is a flat search over its
    centroids, which ``Coarse`` can replace."""
    if not isinstance(index, faiss.Index):
        return False
    index = faiss.downcast_index(index)
    if type(index) not in (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer, faiss.IndexIVFPQ):
        return False
    quantizer = faiss.downcast_index(index.quantizer)
    return type(quantizer) in (faiss.IndexFlatIP, faiss.IndexFlatL2, faiss.IndexFlat) and \
        quantizer.ntotal == index.nlist and quantizer.metric_type == index.metric_type


class Coarse:
    """Centroids [H, nlist, D] of the IVF indexes of one row's heads (trained, same nlist and metric)."""

    def __init__(self, indexes: list):
        self.indexes = indexes  # the row's index list this was built from (the store rebuilds when it changes)
        ivfs = [faiss.downcast_index(i) for i in indexes]
        self.ivfs = ivfs
        self.nlist = ivfs[0].nlist
        self.l2 = ivfs[0].metric_type == faiss.METRIC_L2
        self.centroids = torch.from_numpy(np.stack([i.quantizer.reconstruct_n(0, i.nlist) for i in ivfs]))
        self.sq_norms = (self.centroids * self.centroids).sum(-1)[:, None, :]  # [H, 1, nlist]

    def _scores(self, x: torch.Tensor, heads: list[int]) -> torch.Tensor:
        """[h, n, nlist]: larger is nearer (<x, c> for inner product, 2 <x, c> - |c|^2 for L2)."""
        c = self.centroids[heads]
        s = torch.matmul(x, c.transpose(1, 2))
        if self.l2:
            s.mul_(2).sub_(self.sq_norms[heads])
        return s

    def assign(self, x: torch.Tensor, heads: list[int], m: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``m`` nearest lists of each vector of ``x`` [h, n, D] (float32) in the indexes of ``heads``, nearest
        first: (distances float32 [h, n, m], as the quantizer reports them; list numbers int64 [h, n, m])."""
        m = min(m, self.nlist)
        s = self._scores(x, heads)
        dist, lists = s.topk(m, dim=-1, sorted=True)
        if self.l2:  # |x - c|^2 = |x|^2 - (2 <x, c> - |c|^2)
            dist = (x * x).sum(-1, keepdim=True) - dist
        return np.ascontiguousarray(dist.numpy()), np.ascontiguousarray(lists.numpy())

    def nearest(self, x: torch.Tensor, heads: list[int]) -> np.ndarray:
        """The nearest list of each vector of ``x`` [h, n, D]: int64 [h, n], in blocks of bounded size."""
        h, n = x.shape[:2]
        out = torch.empty(h, n, dtype=torch.int64)
        step = max(1, MAX_SCORE_BLOCK // max(1, h * self.nlist))
        for start in range(0, n, step):
            out[:, start:start + step] = self._scores(x[:, start:start + step], heads).argmax(-1)
        return out.numpy()

    def search(self, head: int, queries: np.ndarray, k: int, lists: np.ndarray, dist: np.ndarray,
               D: np.ndarray, I: np.ndarray) -> None:
        """Search the index of ``head`` for ``queries`` [n, D] in the given ``lists`` / ``dist`` [n, m] (one head of
        ``assign``'s output), writing distances and ids [n, k] into ``D`` and ``I``."""
        n = len(queries)
        queries, lists, dist = (np.ascontiguousarray(a) for a in (queries, lists, dist))  # swig_ptr reads raw memory
        # the _c entry point: Faiss reads min(nprobe, nlist) lists a query, which the wrapper's shape check refuses
        self.ivfs[head].search_preassigned_c(n, faiss.swig_ptr(queries), k, faiss.swig_ptr(lists),
                                             faiss.swig_ptr(dist), faiss.swig_ptr(D), faiss.swig_ptr(I), False)

    def add(self, head: int, x: np.ndarray, lists: np.ndarray) -> None:
        """Append ``x`` [n, D] (float32, C order) to the index of ``head`` in ``lists`` [n], with the next ids."""
        x, lists = np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(lists, dtype=np.int64)
        self.ivfs[head].add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(lists))
