"""KnnStore state round trip (what Document.save/load writes): identical searches after reload, and every state
that does not fit the store refused before anything changes."""

import faiss
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import knn_index


@pytest.mark.parametrize("spec", ["Flat", "IVF16,Flat nprobe=4", "HNSW16", "IVF16,PQ4 nprobe=4", "exact",
                                  "HNSW16 metric=l2", "IVF16,Flat nprobe=4 metric=l2"])
def test_state_round_trip_gives_identical_search(tmp_path, spec):
    torch.manual_seed(0)
    train_size = 600 if spec.startswith("IVF") else None
    make = lambda: knn_index.KnnStore(2, 2, 16, spec, train_size=train_size, dtype=torch.float32)  # noqa: E731
    store = make()
    mask = torch.ones(2, 700, dtype=torch.bool)
    mask[1, :50] = False
    store.add(torch.randn(2, 2, 700, 16), torch.randn(2, 2, 700, 16), mask)
    queries = torch.randn(2, 2, 9, 16)
    expected = store.search(queries, 10)
    save_file(store.state_dict(), tmp_path / "store.safetensors")
    loaded = make()
    loaded.load_state_dict(load_file(tmp_path / "store.safetensors"))
    found = loaded.search(queries, 10)
    assert loaded.sizes() == store.sizes() == [700, 650]
    assert torch.equal(found.ids, expected.ids) and torch.equal(found.scores, expected.scores)
    assert torch.equal(found.values, expected.values)
    if not spec.startswith("HNSW"):  # (Faiss does not save HNSW's random level generator)
        more = torch.randn(2, 2, 50, 16) * 1.05  # keys added after the reload are indexed as in the original store
        store.add(more, more)
        loaded.add(more, more)
        assert torch.equal(loaded.search(queries, 10).ids, store.search(queries, 10).ids)


def _filled(spec, tokens=40, **kw):
    store = knn_index.KnnStore(1, 2, 16, spec, dtype=torch.float32, **kw)
    store.add(torch.randn(1, 2, tokens, 16), torch.randn(1, 2, tokens, 16))
    return store


def _index_bytes(index) -> torch.Tensor:
    return torch.from_numpy(faiss.serialize_index(index).copy())


def _with(state, **changes):
    state = dict(state)
    state.update(changes)
    return state


def _bad_states():
    """(name, state that must be refused by a store with spec 'Flat' holding other keys)."""
    good = _filled("Flat").state_dict()
    flat_ip_8 = faiss.index_factory(8, "Flat", faiss.METRIC_INNER_PRODUCT)
    flat_l2 = faiss.index_factory(16, "Flat", faiss.METRIC_L2)
    hnsw = faiss.index_factory(16, "HNSW8", faiss.METRIC_INNER_PRODUCT)
    short = faiss.index_factory(16, "Flat", faiss.METRIC_INNER_PRODUCT)
    short.add(np.random.rand(39, 16).astype("float32"))
    return [
        ("index of another type", _with(good, **{"index.0.1": _index_bytes(hnsw)})),
        ("index of another dimension", _with(good, **{"index.0.0": _index_bytes(flat_ip_8)})),
        ("index of another metric", _with(good, **{"index.0.0": _index_bytes(flat_l2)})),
        ("index of another size", _with(good, **{"index.0.0": _index_bytes(short)})),
        ("index bytes that are no index", _with(good, **{"index.0.0": torch.arange(64, dtype=torch.uint8)})),
        ("missing index", {k: v for k, v in good.items() if k != "index.0.1"}),
        ("extra tensor", _with(good, extra=torch.zeros(3))),
        ("sizes past the keys", _with(good, sizes=torch.tensor([41]))),
        ("negative size", _with(good, sizes=torch.tensor([-1]))),
        ("indexed beyond stored", _with(good, indexed=torch.tensor([50]))),
        ("a stage the spec does not have", _with(good, stage=torch.tensor([1]))),
        ("keys of another head count", _with(good, keys=torch.randn(1, 3, 40, 16))),
        ("float sizes", _with(good, sizes=torch.tensor([40.0]))),
        ("norms on an ip store", _with(good, augmentation_norms=torch.ones(1, 2, dtype=torch.float64))),
    ]


@pytest.mark.parametrize("name,state", _bad_states(), ids=[n for n, _ in _bad_states()])
def test_states_that_do_not_fit_are_refused_and_leave_the_store_unchanged(name, state):
    store = _filled("Flat", tokens=3)
    queries = torch.randn(1, 2, 2, 16)
    before = store.search(queries, 2)
    with pytest.raises(ValueError, match="state"):
        store.load_state_dict(state)
    assert store.sizes() == [3] and torch.equal(store.search(queries, 2).ids, before.ids)


def test_state_of_another_metric_is_refused():
    other = _filled("HNSW16", tokens=3)
    with pytest.raises(ValueError, match="augmentation_norms"):
        other.load_state_dict(_filled("HNSW16 metric=l2", tokens=5).state_dict())
    assert other.sizes() == [3]  # a refused state leaves the store as it was


def test_state_of_an_untrained_ivf_row_must_hold_an_empty_index():
    store = _filled("IVF4,Flat", tokens=100, train_size=200)  # buffered: not trained yet
    state = store.state_dict()
    assert state["stage"].tolist() == [-1]
    trained = _filled("IVF4,Flat", tokens=200, train_size=200).state_dict()
    with pytest.raises(ValueError, match="trained"):
        store.load_state_dict(_with(state, **{"index.0.0": trained["index.0.0"]}))
