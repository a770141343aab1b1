"""KnnStore state round trip (what Document.save/load writes): identical searches after reload."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import knn_index
from knn_index.state import load_store_state, store_state


@pytest.mark.parametrize("index, params, metric", [
    ("Flat", None, "ip"), ("IVF16,Flat", {"nprobe": 4}, "ip"), ("HNSW16", None, "ip"), ("IVF16,PQ4", {"nprobe": 4}, "ip"),
    ("torch", None, "ip"), ("HNSW16", None, "l2"), ("IVF16,Flat", {"nprobe": 4}, "l2")])
def test_state_round_trip_gives_identical_search(tmp_path, index, params, metric):
    torch.manual_seed(0)
    make = lambda: knn_index.KnnStore(2, 2, 16, index=index, index_params=params, train_size=None  # noqa: E731
                                      if index in ("Flat", "HNSW16", "torch") else 600, dtype=torch.float32,
                                      faiss_metric=metric)
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
    if not index.startswith("HNSW"):  # (Faiss does not save HNSW's random level generator)
        more = torch.randn(2, 2, 50, 16) * 1.05  # keys added after the reload are indexed as in the original store
        store.add(more, more)
        loaded.add(more, more)
        assert torch.equal(loaded.search(queries, 10).ids, store.search(queries, 10).ids)


def test_state_of_another_faiss_metric_is_refused():
    store = knn_index.KnnStore(1, 2, 16, index="HNSW16", faiss_metric="l2", dtype=torch.float32)
    store.add(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    other = knn_index.KnnStore(1, 2, 16, index="HNSW16", dtype=torch.float32)
    other.add(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    with pytest.raises(ValueError, match="faiss_metric='l2'; this store has faiss_metric='ip'"):
        load_store_state(other, store_state(store))
    assert other.sizes() == [3]  # a refused state leaves the store as it was


def test_state_of_another_shape_is_refused():
    store = knn_index.KnnStore(1, 2, 16, dtype=torch.float32)
    store.add(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    with pytest.raises(ValueError, match="does not fit this store"):
        load_store_state(knn_index.KnnStore(1, 3, 16), store_state(store))
