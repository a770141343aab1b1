"""storage=disk: the same results as RAM, crash safety, free-space checks, saved documents, bad settings."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from knn_index import KnnStore, MemorySpec
from knn_index import disk as disk_module

B, H, D = 2, 3, 16


def windows(n: int, seed: int = 0, T: int = 200):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield (torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g),
               torch.rand(B, T, generator=g) > 0.3)


def same(a, b) -> bool:
    return torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("spec", ["Flat k=8", "exact k=8", "IVF8,Flat k=8 nprobe=8", "IVF16,Flat k=6 nprobe=16 train=grow metric=l2"])
def test_disk_matches_ram(tmp_path, spec):
    """Exact indices (and an IVF probing every list) give the same ids, scores and values from disk as from RAM,
    through buffered, trained and masked appends, a head selection, entries(), a saved state and a reopened folder."""
    train = {} if spec.startswith(("Flat", "exact")) else {"train_size": 400 if "grow" not in spec else 1000}
    ram = KnnStore(B, H, D, spec, **train)
    disk = KnnStore(B, H, D, spec + " storage=disk ram_budget=1", directory=tmp_path / "s", **train)
    g = torch.Generator().manual_seed(1)
    for keys, values, mask in windows(6):
        ram.add(keys, values, mask)
        disk.add(keys, values, mask)
        q = torch.randn(B, 2, 5, D, generator=g)
        assert same(ram.search(q, heads=slice(1, 3)), disk.search(q, heads=slice(1, 3)))
        assert same(ram.search(q, k=500, heads=[0, 2]), disk.search(q, k=500, heads=[0, 2]))
    assert ram.sizes() == disk.sizes() and disk.nbytes() <= ram.nbytes() - ram._storage.nbytes()
    assert all(torch.equal(x, y) for x, y in zip(ram.entries(slice(0, 2)), disk.entries(slice(0, 2))))
    q = torch.randn(B, H, 5, D, generator=g)
    state = disk.state_dict()
    assert "keys" not in state and "values" not in state
    disk.close()
    loaded = KnnStore(B, H, D, spec + " storage=disk ram_budget=1", directory=tmp_path / "s", **train)
    loaded.load_state_dict(state)
    assert same(ram.search(q), loaded.search(q))
    loaded.close()
    reopened = KnnStore(B, H, D, spec + " storage=disk ram_budget=1", directory=tmp_path / "s", **train)
    assert same(ram.search(q), reopened.search(q))  # indexes rebuilt from the files
    keys, values, mask = next(windows(1, seed=5))
    ram.add(keys, values, mask)
    reopened.add(keys, values, mask)
    assert same(ram.search(q), reopened.search(q))
    # a RAM state (keys included) loads into a disk store, and a disk store's state needs its files
    fresh = KnnStore(B, H, D, spec + " storage=disk", directory=tmp_path / "t", **train)
    fresh.load_state_dict(ram.state_dict())
    assert same(ram.search(q), fresh.search(q))
    other = KnnStore(B, H, D, spec + " storage=disk", directory=tmp_path / "u", **train)
    with pytest.raises(ValueError, match="sizes"):
        other.load_state_dict(state)


def test_take_reads_only_candidates_within_budget(tmp_path):
    """Gathering from the files equals indexing the keys in RAM, and leaves none of the file's pages mapped."""
    store = KnnStore(1, 2, 64, "exact k=4 storage=disk ram_budget=1", directory=tmp_path)
    keys = torch.randn(1, 2, 20000, 64)
    store.add(keys, keys * 2)
    st = store._storage
    ids = torch.randint(0, 20000, (1, 2, 3, 50))
    got = st.take("keys", ids, [0, 1])
    want = keys.to(torch.bfloat16)[0][torch.arange(2)[:, None, None], ids[0]][None]
    assert torch.equal(got, want)
    assert st.budget_rows == 16  # 1 MiB / 64 KiB per row: 300 rows read in 19 batches
    with open("/proc/self/smaps") as f:
        smaps = f.read().split("\n")
    path = os.path.join(st.directory, "keys.0")
    for i, line in enumerate(smaps):
        if line.endswith(path):
            rss = next(x for x in smaps[i + 1:] if x.startswith("Rss:"))
            assert int(rss.split()[1]) == 0, rss


def test_ram_reserve_is_exact():
    store = KnnStore(1, 2, 8, "Flat k=4")
    store.reserve(1000)
    assert store._storage.capacity == 1000
    for keys, values, _ in windows(5, T=200):
        store.add(keys[:1, :2, :, :8], values[:1, :2, :, :8])
    assert store._storage.capacity == 1000 and store.sizes() == [1000]
    with pytest.raises(ValueError, match="tokens must be a positive int"):
        store.reserve(0)


# ------------------------------------------------------------------------------------------------ crash safety
def filled(path, n=3):
    store = KnnStore(B, H, D, "exact k=4 storage=disk", directory=path)
    for keys, values, mask in windows(n):
        store.add(keys, values, mask)
    sizes = store.sizes()
    store.close()
    return sizes


def reference(n):
    store = KnnStore(B, H, D, "exact k=4")
    for keys, values, mask in windows(n):
        store.add(keys, values, mask)
    return store


def test_torn_tail_opens_at_last_complete_window(tmp_path):
    sizes = filled(tmp_path)
    with open(tmp_path / "keys.1", "ab") as f:  # a killed append wrote data but no journal record
        f.write(os.urandom(1000))
    with open(tmp_path / "journal", "ab") as f:  # and half a record
        f.write(os.urandom(10))
    store = KnnStore(B, H, D, "exact k=4 storage=disk", directory=tmp_path)
    assert store.sizes() == sizes
    assert os.path.getsize(tmp_path / "keys.1") == sizes[1] * H * D * 2  # the torn tail is cut
    q = torch.randn(B, H, 4, D)
    assert same(store.search(q), reference(3).search(q))


def test_damaged_store_is_refused(tmp_path):
    filled(tmp_path / "a")
    with open(tmp_path / "a" / "values.0", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="data was lost"):
        KnnStore(B, H, D, "exact k=4 storage=disk", directory=tmp_path / "a")

    filled(tmp_path / "b")
    with open(tmp_path / "b" / "keys.0", "r+b") as f:  # one flipped byte
        f.seek(1234)
        byte = f.read(1)
        f.seek(1234)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ValueError, match="fail their checksum"):
        KnnStore(B, H, D, "exact k=4 storage=disk", directory=tmp_path / "b")
    assert KnnStore(B, H, D, "exact k=4 storage=disk", directory=tmp_path / "b", verify=False).sizes() == \
        reference(3).sizes()  # verify=False trusts the data (the journal is still checked)

    filled(tmp_path / "c")
    header = disk_module.HEADER.size
    with open(tmp_path / "c" / "journal", "r+b") as f:  # a record before the last one
        f.seek(header + 5)
        f.write(b"\xff")
    with pytest.raises(ValueError, match="record 0 of 3 is corrupted"):
        KnnStore(B, H, D, "exact k=4 storage=disk", directory=tmp_path / "c")

    filled(tmp_path / "d")
    with pytest.raises(ValueError, match="holds a store of batch 2, heads 3, head_dim 16"):
        KnnStore(B, H, 8, "exact k=4 storage=disk", directory=tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keys.0").write_bytes(b"x")
    with pytest.raises(ValueError, match="but no journal"):
        KnnStore(B, H, D, "exact k=4 storage=disk", directory=tmp_path / "e")


KILLED_WRITER = """
import sys, torch, knn_index
store = knn_index.KnnStore(1, 4, 64, "exact k=4 storage=disk", directory=sys.argv[1])
g = torch.Generator().manual_seed(0)
while True:
    keys = torch.randn(1, 4, 4096, 64, generator=g)
    store.add(keys, -keys)
"""


def test_killed_mid_append_loads_complete_windows(tmp_path):
    """A process killed while appending leaves whole windows, the same keys it was given, all CRCs valid."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(tmp_path)], env=env)
    record = 4 + disk_module.ROW.size + 4
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            journal = tmp_path / "journal"
            if journal.exists() and journal.stat().st_size >= disk_module.HEADER.size + 5 * record:
                break
            assert proc.poll() is None, "the writer died"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    store = KnnStore(1, 4, 64, "exact k=4 storage=disk", directory=tmp_path)
    n = store.sizes()[0]
    assert n >= 5 * 4096 and n % 4096 == 0
    g = torch.Generator().manual_seed(0)
    want = torch.cat([torch.randn(1, 4, 4096, 64, generator=g) for _ in range(n // 4096)], dim=2).to(torch.bfloat16)
    keys, values, _ = store.entries(slice(None))
    assert torch.equal(keys, want) and torch.equal(values, -want)


# ------------------------------------------------------------------------------------------------ disk space
def test_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
    store = KnnStore(B, H, D, "exact k=4 storage=disk", directory=tmp_path)
    keys, values, mask = next(windows(1))
    store.add(keys, values, mask)
    sizes, journal = store.sizes(), os.path.getsize(tmp_path / "journal")
    real = disk_module.shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return usage._replace(free=disk_module.DISK_HEADROOM + 1000)

    monkeypatch.setattr(disk_module.shutil, "disk_usage", nearly_full)
    with pytest.raises(OSError, match="needs .* MiB more on disk") as error:
        store.add(keys, values, mask)
    assert error.value.errno == errno.ENOSPC
    assert store.sizes() == sizes and os.path.getsize(tmp_path / "journal") == journal
    with pytest.raises(OSError, match="free space or choose another directory"):
        store.reserve(10_000)
    store.reserve(sizes[0])  # nothing more to write: no error


# ------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("text, message", [
    ("Flat storage=cloud", r"storage='cloud' is unknown; accepted values: \('ram', 'disk'\)"),
    ("Flat ram_budget=64", "ram_budget=64 sizes a disk memory; add storage=disk"),
    ("Flat storage=disk ram_budget=0", r"ram_budget must be an int in \[1, "),
    ("dense storage=disk", "storage=disk needs a kNN index"),
    ("Flat storage=disk budget=1", "unknown option 'budget'; accepted: .*storage, ram_budget"),
])
def test_bad_specs(text, message):
    with pytest.raises(ValueError, match=message):
        MemorySpec.parse(text)


def test_spec_round_trip():
    spec = MemorySpec.parse("IVF64,PQ8 k=8 storage=disk ram_budget=32")
    assert (spec.storage, spec.ram_budget) == ("disk", 32)
    assert MemorySpec.parse(str(spec)) == spec == MemorySpec.coerce(spec.to_dict())
    assert str(MemorySpec.parse("Flat k=8")) == "Flat k=8"


def test_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="directory=.* is for storage=disk"):
        KnnStore(1, 1, 4, "Flat", directory=tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        KnnStore(1, 1, 4, "Flat storage=disk", directory=tmp_path / "file")


def test_temporary_directory_is_removed():
    store = KnnStore(1, 1, 4, "Flat storage=disk")
    folder = store.directory
    store.add(torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 4))
    assert os.path.isdir(folder)
    store.close()
    assert not os.path.exists(folder)
    store = KnnStore(1, 1, 4, "Flat storage=disk")
    folder = store.directory
    del store
    assert not os.path.exists(folder)


# ------------------------------------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def demo():
    from knn_longllama.demo import load_demo

    return load_demo(mem_dtype="bfloat16")


def test_model_logits_equal_in_ram_and_on_disk(demo):
    model, _ = demo
    ids = torch.randint(3, model.config.vocab_size, (2, 256 * 4 + 70), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :100] = 0  # left padding: rows of different sizes
    with torch.no_grad():
        ram = model(ids, attention_mask=mask, memory_spec="Flat k=8").logits
        disk = model(ids, attention_mask=mask, memory_spec="Flat k=8 storage=disk ram_budget=1").logits
    assert torch.equal(ram, disk)


def test_document_on_disk_saves_and_loads_in_place(demo, tmp_path):
    from knn_longllama.document import Document

    model, _ = demo
    ids = torch.randint(3, model.config.vocab_size, (256 * 6 + 90,), generator=torch.Generator().manual_seed(1))
    question = [5, 6, 7, 8]
    ram = Document.read(model, ids, memory_spec="Flat k=8", progress=False)
    doc = Document.read(model, ids, memory_spec="Flat k=8 storage=disk", memory_dir=tmp_path / "book.d",
                        progress=False)
    want = ram.ask(question, max_new_tokens=6)
    assert torch.equal(doc.ask(question, max_new_tokens=6), want)
    doc.save(tmp_path / "book.memory")
    doc.close()
    assert sorted(os.listdir(tmp_path / "book.d")) == [f"layer{i}" for i in model.config.mem_layers]
    loaded = Document.load(tmp_path / "book.memory", model)
    assert torch.equal(loaded.ask(question, max_new_tokens=6), want)
    assert loaded.memory_dir == str(tmp_path / "book.d")
    loaded.close()
    # the folder moves with the memory file (recorded relative to it)
    os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "_moved"))
    moved = tmp_path.with_name(tmp_path.name + "_moved")
    try:
        again = Document.load(moved / "book.memory", model, verify_data=False)
        assert torch.equal(again.ask(question, max_new_tokens=6), want)
        again.close()
        with open(moved / "book.d" / "layer2" / "keys.0", "r+b") as f:  # data corrupted after the save
            f.seek(100)
            f.write(b"\x00\x01\x02")
        with pytest.raises(ValueError, match="fail their checksum"):
            Document.load(moved / "book.memory", model)
        with open(moved / "book.d" / "layer1" / "journal", "ab") as f:  # appended to after the save
            f.write(b"x")
        with pytest.raises(ValueError, match="differs from the journal saved in the manifest"):
            Document.load(moved / "book.memory", model)
        os.rename(moved / "book.d", moved / "elsewhere")
        with pytest.raises(ValueError, match="is missing"):
            Document.load(moved / "book.memory", model)
    finally:
        os.rename(moved, tmp_path)


def test_document_disk_settings(demo, tmp_path):
    from knn_longllama.document import Document

    model, _ = demo
    ids = [7] * (256 * 2 + 60)
    with pytest.raises(ValueError, match="memory_dir=.* is the folder of a storage=disk memory"):
        Document.read(model, ids, memory_spec="Flat k=8", memory_dir=tmp_path, progress=False)
    doc = Document.read(model, ids, memory_spec="Flat k=8 storage=disk", progress=False)
    folders = [m.store.directory for m in doc.memories.values()]
    with pytest.raises(ValueError, match="temporary folder; read it with memory_dir="):
        doc.save(tmp_path / "x.memory")
    doc.close()
    assert not any(os.path.exists(f) for f in folders)
    Document.read(model, ids, memory_spec="Flat k=8 storage=disk", memory_dir=tmp_path / "m", progress=False).close()
    with pytest.raises(ValueError, match="already holds a memory; choose an empty folder"):
        Document.read(model, ids, memory_spec="Flat k=8 storage=disk", memory_dir=tmp_path / "m", progress=False)


def test_document_read_checks_disk_space_first(demo, tmp_path, monkeypatch):
    from knn_longllama.document import Document

    model, _ = demo
    real = disk_module.shutil.disk_usage
    monkeypatch.setattr(disk_module.shutil, "disk_usage", lambda p: real(p)._replace(free=disk_module.DISK_HEADROOM))
    with pytest.raises(OSError, match="needs .* MiB more on disk"):
        Document.read(model, [5] * (256 * 8), memory_spec="Flat k=8 storage=disk",
                      memory_dir=tmp_path / "m", progress=False)
    # nothing was written past the empty journals
    assert all(os.path.getsize(tmp_path / "m" / f"layer{i}" / "keys.0") == 0 for i in model.config.mem_layers)


def test_cli_read_and_ask_with_memory_dir(tmp_path):
    from knn_longllama import cli

    text = tmp_path / "book.txt"
    text.write_text("The grass is green. " * 400 + "The pass key is 1234.\n")
    rc = cli.main(["read", str(text), "-o", str(tmp_path / "book.memory"), "--memory", "Flat k=8 storage=disk",
                   "--memory-dir", str(tmp_path / "book.d"), "--quiet", "--threads", "1"])
    assert rc == 0 and (tmp_path / "book.d" / "layer1" / "journal").exists()
    assert cli.main(["ask", str(tmp_path / "book.memory"), "What is the pass key?", "--max-new-tokens", "3"]) == 0
    assert cli.main(["read", str(text), "-o", str(tmp_path / "b2.memory"), "--memory", "Flat k=8",
                     "--memory-dir", str(tmp_path / "x")]) == 2


def test_chunked_index_adds_equal_one_add(monkeypatch):
    """Keys reach the index ADD_CHUNK at a time (bounded float32 copies); the l2 norm still comes from all keys of
    the first add, so results equal one add of everything."""
    from knn_index import store as store_module

    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 2, 5000, 8, generator=g) * torch.linspace(0.5, 2, 5000)[:, None]  # longest keys last
    values, q = torch.randn(1, 2, 5000, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    whole = KnnStore(1, 2, 8, "Flat k=5 metric=l2")
    whole.add(keys, values)
    monkeypatch.setattr(store_module, "ADD_CHUNK", 700)
    chunked = KnnStore(1, 2, 8, "Flat k=5 metric=l2")
    chunked.add(keys, values)
    assert np.array_equal(whole._norms, chunked._norms)
    assert same(whole.search(q), chunked.search(q))


@pytest.mark.parametrize("spec", ["exact k=2 block=16", "Flat k=3 block=8 sinks", "IVF4,Flat k=2 nprobe=4 block=8"])
def test_block_memory_on_disk_matches_ram(tmp_path, spec):
    """Block retrieval with its tokens in files: the same entries as in RAM, window after window, rows of
    different sizes; saved and opened in place (state without tokens), refused when the files hold other sizes."""
    from knn_longllama.memory import make_memory

    spec = spec.replace(" sinks", "")
    ram = make_memory(spec, B, H, D, dtype=torch.bfloat16, device="cpu")
    disk = make_memory(spec + " storage=disk ram_budget=1", B, H, D, dtype=torch.bfloat16, device="cpu",
                       directory=tmp_path / "m")
    g = torch.Generator().manual_seed(3)
    for keys, values, mask in windows(4, seed=5, T=40):
        ram.add(keys, values, mask)
        disk.add(keys, values, mask)
        queries = torch.randn(B, H, 6, D, generator=g)
        want, got = ram.entries_for(queries[:, 1:], 1, H), disk.entries_for(queries[:, 1:], 1, H)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert disk.nbytes() < ram.nbytes() and disk.sizes() == ram.sizes()
    state = disk.state_dict()
    assert "keys" not in state and "values" not in state
    disk.store.flush()
    disk.close()
    opened = make_memory(spec + " storage=disk ram_budget=1", B, H, D, dtype=torch.bfloat16, device="cpu",
                         directory=tmp_path / "m")
    opened.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ram.entries_for(queries, 0, H), opened.entries_for(queries, 0, H)))
    with pytest.raises(ValueError, match="the files in .* hold"):
        opened.load_state_dict(dict(state, sizes=state["sizes"] - 1))
    with pytest.raises(ValueError, match="is for storage=disk"):
        make_memory(spec, B, H, D, dtype=torch.bfloat16, device="cpu", directory=tmp_path / "other")


@pytest.mark.parametrize("spec", ["exact k=2 block=4", "Flat k=3"])
def test_document_with_sinks_on_disk(tmp_path, spec):
    """A training-free-style model (distance, sinks; blocks or tokens) reads to disk: the same answers as in RAM;
    saved, reloaded in place (the sinks' load leaves the opened files alone) and checked like any disk memory."""
    from conftest import tiny_model

    from knn_longllama.document import Document

    model = tiny_model(seed=8, mem_distance=12, mem_sink_tokens=3, memory_spec="exact k=2 block=4", mem_layers=[1, 2],
                       attn_implementation="sdpa")
    ids = torch.randint(3, model.config.vocab_size, (90,), generator=torch.Generator().manual_seed(2)).tolist()
    want = Document.read(model, ids, memory_spec=spec, progress=False).ask([4, 5], max_new_tokens=30)  # evicts
    doc = Document.read(model, ids, memory_spec=spec + " storage=disk", memory_dir=tmp_path / "d", progress=False)
    assert torch.equal(doc.ask([4, 5], max_new_tokens=30), want)
    doc.save(tmp_path / "doc.memory")
    doc.close()
    loaded = Document.load(tmp_path / "doc.memory", model)
    assert torch.equal(loaded.ask([4, 5], max_new_tokens=30), want)
    loaded.close()
    with open(tmp_path / "d" / "layer1" / "values.0", "r+b") as f:
        f.write(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="fail their checksum"):
        Document.load(tmp_path / "doc.memory", model)
