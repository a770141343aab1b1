"""A KnnStore as a flat dict of tensors (for safetensors) and back: keys, values, row sizes, Faiss indices.

Faiss indices travel as the bytes of `faiss.serialize_index` (the `faiss.write_index` format) in uint8 tensors;
GPU indices are copied to the CPU first. Nothing is pickled.
"""

import faiss
import numpy as np
import torch


def store_state(store) -> dict[str, torch.Tensor]:
    """Everything needed to rebuild `store` (a `KnnStore`) with `load_store_state`."""
    st = store._storage
    used = max(st.sizes)
    state = {
        "sizes": torch.tensor(st.sizes, dtype=torch.int64),
        "keys": st.keys[:, :, :used].contiguous(),
        "values": st.values[:, :, :used].contiguous(),
    }
    if store.backend == "faiss":
        state["trained"] = torch.tensor(store._trained, dtype=torch.bool)
        state["indexed"] = torch.tensor(store._indexed, dtype=torch.int64)
        if store.faiss_metric != "ip":  # the norm that later keys are augmented to
            state["augmentation_norms"] = torch.from_numpy(store._norms.copy())
        for b, row in enumerate(store._indexes):
            for h, index in enumerate(row):
                if store._gpu is not None:
                    index = faiss.index_gpu_to_cpu(index)
                state[f"index.{b}.{h}"] = torch.from_numpy(faiss.serialize_index(index).copy())
    return state


def load_store_state(store, state: dict[str, torch.Tensor]) -> None:
    """Fill an empty `store` built with the same configuration from `store_state` output."""
    from . import factory

    sizes = state["sizes"].tolist()
    if len(sizes) != store.batch_size or state["keys"].shape[1] != store.num_heads or \
            state["keys"].shape[-1] != store.head_dim:
        raise ValueError(f"state holds keys of shape {tuple(state['keys'].shape)}, which does not fit this store "
                         f"(batch {store.batch_size}, heads {store.num_heads}, head_dim {store.head_dim})")
    if store.backend == "faiss" and ("augmentation_norms" in state) != (store.faiss_metric != "ip"):
        saved = "l2" if "augmentation_norms" in state else "ip"
        raise ValueError(f"state was saved from a store with faiss_metric={saved!r}; this store has "
                         f"faiss_metric={store.faiss_metric!r}")
    store.reset()
    st = store._storage
    for b, n in enumerate(sizes):
        st.append_row(b, state["keys"][b, :, :n].to(st.device, st.dtype), state["values"][b, :, :n].to(st.device, st.dtype))
    if store.backend != "faiss":
        return
    store._trained = state["trained"].tolist()
    store._indexed = state["indexed"].tolist()
    if "augmentation_norms" in state:
        store._norms = state["augmentation_norms"].numpy().astype(np.float64).copy()
    for b in range(store.batch_size):
        for h in range(store.num_heads):
            index = faiss.deserialize_index(np.ascontiguousarray(state[f"index.{b}.{h}"].numpy()))
            if store._gpu is not None:
                index = factory.to_gpu(index, store._gpu, store.device.index or 0)
            factory.apply_params(index, store.index_params)
            store._indexes[b][h] = index
