"""KnnStore state round trip (what Document.save/load writes): identical searches after reload."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import knn_index
from knn_index.state import load_store_state, store_state


@pytest.mark.parametrize("index, params", [("Flat", None), ("IVF16,Flat", {"nprobe": 4}), ("HNSW16", None),
                                           ("IVF16,PQ4", {"nprobe": 4}), ("torch", None)])
def test_state_round_trip_gives_identical_search(tmp_path, index, params):
    torch.manual_seed(0)
    make = lambda: knn_index.KnnStore(2, 2, 16, index=index, index_params=params, train_size=None  # noqa: E731
                                      if index in ("Flat", "HNSW16", "torch") else 600, dtype=torch.float32)
    store = make()
    mask = torch.ones(2, 700, dtype=torch.bool)
    mask[1, :50] = False
    store.add(torch.randn(2, 2, 700, 16), torch.randn(2, 2, 700, 16), mask)
    queries = torch.randn(2, 2, 9, 16)
    expected = store.search(queries, 10)
    save_file(store_state(store), tmp_path / "store.safetensors")
    loaded = make()
    load_store_state(loaded, load_file(tmp_path / "store.safetensors"))
    found = loaded.search(queries, 10)
    assert loaded.sizes() == store.sizes() == [700, 650]
    assert torch.equal(found.ids, expected.ids) and torch.equal(found.scores, expected.scores)
    assert torch.equal(found.values, expected.values)


def test_state_of_another_shape_is_refused():
    store = knn_index.KnnStore(1, 2, 16, dtype=torch.float32)
    store.add(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    with pytest.raises(ValueError, match="does not fit this store"):
        load_store_state(knn_index.KnnStore(1, 3, 16), store_state(store))
