"""Hostile and mistaken input: every case gets a clear ValueError (library) or one line and exit status 2 (CLI),
nothing is lost, and memory files are verified end to end. One test per case of the hardening issue."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from knn_index import KnnStore, MemorySpec
from knn_longllama import document as document_module
from knn_longllama.document import Document

from conftest import tiny_model

CLI = [sys.executable, "-m", "knn_longllama.cli"]


def cli(*args, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def cli_in_process(capsys, *args):
    """The CLI's main() in this process (no interpreter start-up), as a CompletedProcess-like result."""
    from knn_longllama.cli import main

    returncode = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, returncode, out.out, out.err)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def resign(path, tensors=None, edit=None, checksums=True):
    """Rewrite a memory file as someone without the key could: change tensors and/or the manifest, recompute the
    tensor checksums (unless `checksums` is False) and the plain SHA-256 digest."""
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = tensors if tensors is not None else safetensors.torch.load_file(path)
    manifest = json.loads(metadata["knn_longllama_manifest"])
    if checksums:
        manifest["checksums"] = {n: document_module._sha256(t) for n, t in tensors.items()}
    if edit is not None:
        edit(manifest)
    text = json.dumps(manifest, sort_keys=True)
    metadata = {"knn_longllama_manifest": text,
                "knn_longllama_digest": "sha256:" + hashlib.sha256(text.encode()).hexdigest()}
    safetensors.torch.save_file(tensors, path, metadata=metadata)


@pytest.fixture
def saved(tmp_path):
    model = tiny_model(mem_layers=[1], memory_spec="Flat k=4")
    path = tmp_path / "doc.memory"
    Document.read(model, torch.randint(3, 61, (1, 100)), progress=False).save(path)
    return model, path


# 1 ------------------------------------------------------------------------------------------------------------
def test_1_read_never_guesses_between_a_path_and_text(tmp_path, capsys):
    model = tiny_model(mem_layers=[1])
    with pytest.raises(ValueError, match="ambiguous: pass `path=`"):
        Document.read(model, "does_not_exist.txt", progress=False)
    with pytest.raises(ValueError, match="path 'does_not_exist.txt' does not exist"):
        Document.read(model, path="does_not_exist.txt", progress=False)
    with pytest.raises(ValueError, match="is not a regular file"):
        Document.read(model, path=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 61\)"):
        Document.read(model, [5, 99], progress=False)
    for missing in ("does_not_exist.txt", str(tmp_path)):
        proc = cli_in_process(capsys, "read", missing, "-o", str(tmp_path / "out.memory"))
        assert_one_line_error(proc, repr(missing))
    assert not (tmp_path / "out.memory").exists()


# 2 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("last_context_length", 9), ("num_tokens", 101), ("memory_spec", "exact k=4"),
                                         ("mem_layers", [0])])
def test_2_an_edited_manifest_is_refused(saved, field, value):
    model, path = saved
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    manifest = json.loads(metadata["knn_longllama_manifest"])
    manifest[field] = value
    metadata["knn_longllama_manifest"] = json.dumps(manifest, sort_keys=True)
    safetensors.torch.save_file(safetensors.torch.load_file(path), path, metadata=metadata)
    with pytest.raises(ValueError, match="does not match its digest"):
        Document.load(path, model)


@pytest.mark.parametrize("field,value,message", [
    ("last_context_length", 3, "not a read state"), ("num_tokens", 101, "manifest says num_tokens=101"),
    ("mem_layers", [0], r"memory layers \[0\] differ"), ("memory_spec", "HNSW0", "at least 1"),
    ("memory_spec", "exact k=4", "state does not fit"), ("num_tokens", "100", "exactly format_version")])
def test_2_every_manifest_field_is_validated_even_with_a_matching_digest(saved, field, value, message):
    model, path = saved
    resign(path, edit=lambda m: m.__setitem__(field, value))
    with pytest.raises(ValueError, match=message):
        Document.load(path, model)


# 3 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop", ["all", "one"])
def test_3_a_file_cannot_switch_its_own_verification_off(saved, drop):
    model, path = saved
    tensors = safetensors.torch.load_file(path)
    tensors["layer1.keys"] = torch.randn_like(tensors["layer1.keys"])  # changed, and its checksum removed

    def edit(manifest):
        manifest["checksums"] = {} if drop == "all" else {n: c for n, c in manifest["checksums"].items()
                                                          if n != "layer1.keys"}
    resign(path, tensors, edit, checksums=False)
    with pytest.raises(ValueError, match="every tensor must have a checksum"):
        Document.load(path, model)


# 4 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                                    "model.layers.1.input_layernorm.weight", "model.layers.0.self_attn.q_proj.weight"])
def test_4_the_fingerprint_covers_every_weight_that_shapes_memory(saved, weight):
    model, path = saved
    other = tiny_model(mem_layers=[1], memory_spec="Flat k=4")
    with torch.no_grad():
        dict(other.named_parameters())[weight].add_(0.01)
    with pytest.raises(ValueError, match="another model"):
        Document.load(path, other)
    later = tiny_model(mem_layers=[1], memory_spec="Flat k=4")
    with torch.no_grad():  # weights after the last memory layer do not shape memory: still accepted
        later.model.layers[2].mlp.up_proj.weight.add_(0.01)
    Document.load(path, later)


# 5 ------------------------------------------------------------------------------------------------------------
def _index(d, spec, metric, n=0):
    index = faiss.index_factory(d, spec, metric)
    if n:
        index.add(np.random.rand(n, d).astype("float32"))
    return torch.from_numpy(faiss.serialize_index(index).copy())


@pytest.mark.parametrize("case", ["type", "dimension", "metric", "size"])
def test_5_faiss_indexes_are_checked_against_the_manifest_and_keys(saved, case):
    model, path = saved
    tensors = safetensors.torch.load_file(path)
    n, d, ip = tensors["layer1.keys"].shape[2], model.config.head_dim, faiss.METRIC_INNER_PRODUCT
    tensors["layer1.index.0.0"] = {"type": lambda: _index(d, "HNSW8", ip, n), "dimension": lambda: _index(d + 2, "Flat", ip, n),
                                   "metric": lambda: _index(d, "Flat", faiss.METRIC_L2, n),
                                   "size": lambda: _index(d, "Flat", ip, n - 16)}[case]()
    resign(path, tensors)
    with pytest.raises(ValueError, match=r"state\['index.0.0'\]"):
        Document.load(path, model)


# 6 and 7 ------------------------------------------------------------------------------------------------------
CRASHING = ["HNSW0", "HNSW1", "IVF0,Flat", "PQ4x0", "RR0,Flat", "NSG2", "IVF4_HNSW0,Flat", "IVF4(IVF0,Flat),Flat"]


@pytest.mark.parametrize("index", CRASHING)
def test_6_index_strings_that_crash_faiss_are_refused_before_faiss_sees_them(index):
    with pytest.raises(ValueError, match="index="):
        MemorySpec(index)
    with pytest.raises(ValueError, match="index="):
        KnnStore(1, 1, 16, index)


def test_6_the_cli_never_dies_from_an_index_string(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("The grass is green.\n" * 50)
    for index, needle in (("HNSW1", "HNSW needs M >= 2"), ("HNSW0", "at least 1")):
        proc = cli("read", str(text), "-o", str(tmp_path / "x.memory"), "--memory", index)
        assert_one_line_error(proc, "--memory", needle)


@pytest.mark.parametrize("spec,message", [
    ("IVF16,Flat nprobe=0", r"index_params: nprobe must be an int in \[1, 1048576\], got 0"),
    ("IVF16,Flat nprobe=-1", "got -1"), ("IVF16,Flat nprobe=1e12", "got 1000000000000"),
    ("HNSW16 efSearch=0", "efSearch must be an int"), ("HNSW16 efSearch=-5", "got -5"),
    ("IVF16,Flat nprobe=a", "got 'a'"), ("IVF16,Flat nprobe=2.7", "got 2.7"),
    ("Flat k=1e9", r"k must be an int in \[1, 16777216\]"), ("IVF16,Flat bogus=3", "unknown option 'bogus'")])
def test_7_search_parameters_are_validated_at_construction(spec, message):
    with pytest.raises(ValueError, match=message):
        MemorySpec.parse(spec)
    with pytest.raises(ValueError, match="index_params"):
        MemorySpec("IVF16,Flat", index_params={"nprobe": 2.7})
    with pytest.raises(ValueError, match="index_params: cannot set nprobe"):
        KnnStore(1, 1, 16, "HNSW16 nprobe=3")  # a parameter this index does not have


# 8, 9, 11 (CLI arguments) -------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["passkey", "--lengths", "0"], "--lengths"), (["passkey", "--lengths", "-5"], "--lengths"),
    (["passkey", "--lengths", "40"], "at least"), (["passkey", "--lengths", "1000000000"], "GiB of RAM"),
    (["passkey", "--trials", "0"], "--trials"), (["passkey", "--trials", "-3"], "--trials"),
    (["passkey", "--threads", "0"], "--threads"), (["passkey", "--threads", "-1"], "--threads"),
    (["passkey", "--threads", "100000"], "--threads"), (["passkey", "--device", "nonsense"], "--device"),
    (["passkey", "--device", "cuda"] if not torch.cuda.is_available() else ["passkey", "--device", "tpu"], "--device"),
    (["passkey", "--memory", "Flat k=0"], "--memory"), (["passkey", "--bogus"], "unrecognized"),
    (["ask", "missing.memory", "q?"], "does not exist"), (["generate"], "PROMPT"),
])
def test_8_9_11_bad_arguments_get_one_line_and_exit_2(args, needle, capsys):
    assert_one_line_error(cli_in_process(capsys, *args), needle)


@pytest.mark.parametrize("manifest", ["[1]", "null", "{}", '{"format_version": 2}', "not json"])
def test_11_malformed_manifests_get_one_line(saved, manifest, capsys):
    model, path = saved
    metadata = {"knn_longllama_manifest": manifest,
                "knn_longllama_digest": "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()}
    safetensors.torch.save_file(safetensors.torch.load_file(path), path, metadata=metadata)
    with pytest.raises(ValueError, match=str(path.name)):
        Document.load(path, model)
    proc = cli_in_process(capsys, "ask", str(path), "q?")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# 10 -----------------------------------------------------------------------------------------------------------
def test_10_the_output_path_is_checked_before_any_work(tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("The grass is green.\n" * 50)
    before = text.read_bytes()
    for output, needle in ((tmp_path / "missing" / "out.memory", "does not exist"), (tmp_path, "is a folder"),
                           (text, "is the input file")):
        assert_one_line_error(cli_in_process(capsys, "read", str(text), "-o", str(output), "--quiet"), needle)
    assert text.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["doc.txt"]
    if os.path.isdir("/proc"):  # a folder that refuses new files although access() says it is writable
        assert_one_line_error(cli_in_process(capsys, "read", str(text), "-o", "/proc/doc.memory", "--quiet"),
                              "cannot write the memory file")


# 12 -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_12_saves_are_fsynced_follow_the_umask_and_clean_stale_temp_files(tmp_path, monkeypatch, umask, mode):
    model = tiny_model(mem_layers=[1])
    doc = Document.read(model, torch.randint(3, 61, (1, 60)), progress=False)
    stale = tmp_path / ".doc.memory.tmp-999999999-abcd"  # a save killed long ago (no such process)
    stale.write_bytes(b"partial")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(document_module.os, "fsync", lambda fd: synced.append(os.fstat(fd).st_mode) or real_fsync(fd))
    old = os.umask(umask)
    try:
        doc.save(tmp_path / "doc.memory")
    finally:
        os.umask(old)
    assert [oct(m & 0o170000) for m in synced] == [oct(0o100000), oct(0o040000)]  # the file, then its folder
    assert os.stat(tmp_path / "doc.memory").st_mode & 0o777 == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.memory"]


# 13 -----------------------------------------------------------------------------------------------------------
def test_13_a_k_above_the_memory_size_offers_the_memory_once_not_a_copy_per_query():
    from knn_longllama.memory import KnnMemory

    memory = KnnMemory(1, 2, 8, "Flat k=1000000", dtype=torch.float32, device="cpu")
    memory.add(torch.randn(1, 2, 300, 8), torch.randn(1, 2, 300, 8), torch.ones(1, 300, dtype=torch.bool))
    found = memory.lookup(torch.randn(1, 2, 64, 8), 0, 2)
    assert found.values.shape == (1, 2, 300, 8) and found.scores.shape == (1, 2, 64, 300)
    assert found.values.data_ptr() == memory.store.entries(slice(0, 2))[1].data_ptr()  # a view of the storage


# 14 -----------------------------------------------------------------------------------------------------------
def test_14_the_progress_bar_moves_once_per_window(monkeypatch):
    updates = []

    class Bar:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            updates.append(n)

    monkeypatch.setattr(document_module, "tqdm", Bar)
    model = tiny_model(mem_layers=[1])  # windows of 16 tokens, 8 kept local
    Document.read(model, torch.randint(3, 61, (1, 200)), progress=True)
    assert updates == [16] * 12


# fuzz ---------------------------------------------------------------------------------------------------------
FUZZ = textwrap.dedent("""
    import hashlib, json, random, sys
    import faiss, numpy as np, safetensors, safetensors.torch, torch
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_model
    from knn_longllama.document import Document, _sha256
    path, rounds = sys.argv[2], int(sys.argv[3])
    rng = random.Random(0)
    model = tiny_model(mem_layers=[0, 2], memory_spec="IVF2,Flat k=4 nprobe=1")
    doc = Document.read(model, torch.randint(3, 61, (1, 900), generator=torch.Generator().manual_seed(0)),
                        progress=False)
    doc.save(path)
    question = torch.tensor([[5, 6, 7]])
    expected = doc.ask(question, max_new_tokens=3, do_sample=False)
    original = open(path, "rb").read()
    tensors = {name: t.clone() for name, t in safetensors.torch.load_file(path).items()}  # not views of the file
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()

    def resign(tensors, manifest):
        manifest["checksums"] = {n: _sha256(t) for n, t in tensors.items()}
        text = json.dumps(manifest)
        safetensors.torch.save_file(tensors, path, metadata={
            "knn_longllama_manifest": text, "knn_longllama_digest": "sha256:" + hashlib.sha256(text.encode()).hexdigest()})

    def mutate(kind):
        data = bytearray(original)
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            open(path, "wb").write(bytes(data))
        elif kind == "truncate":
            open(path, "wb").write(bytes(data[: rng.randrange(len(data))]))
        elif kind == "manifest":  # any edit; re-signed (as anyone without the key can) only with invalid values
            manifest = json.loads(metadata["knn_longllama_manifest"])
            field = rng.choice(sorted(manifest))
            manifest[field] = rng.choice([None, -1, 0, 1, 10**9, "x", [], {}, [1], "exact k=4", "HNSW1", 2.5, True,
                                          "IVF2,Flat k=4 nprobe=2"])
            if manifest[field] != "IVF2,Flat k=4 nprobe=2" and rng.random() < 0.5:
                resign(dict(tensors), manifest)
            else:
                safetensors.torch.save_file(tensors, path, metadata=dict(metadata, knn_longllama_manifest=json.dumps(manifest)))
        elif kind == "swap":  # two tensors trade places under their old names and checksums
            t = dict(tensors)
            a, b = rng.sample(sorted(t), 2)
            t[a], t[b] = t[b], t[a]
            safetensors.torch.save_file(t, path, metadata=metadata)
        elif kind == "faiss":
            t = dict(tensors)
            name = rng.choice([n for n in t if ".index." in n])
            d = rng.choice([8, 10, 16])
            spec = rng.choice(["Flat", "IVF2,Flat", "HNSW4", "IVF4,Flat", "PQ2x4"])
            index = faiss.index_factory(d, spec, rng.choice([faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2]))
            x = np.random.default_rng(rng.randrange(99)).random((rng.choice([0, 100, 300]), d), dtype="float32")
            if not index.is_trained and len(x) >= 100:
                index.train(x)
            if index.is_trained:
                index.add(x)
            t[name] = torch.from_numpy(faiss.serialize_index(index).copy())
            resign(t, json.loads(metadata["knn_longllama_manifest"]))

    outcomes = {}
    for i in range(rounds):
        kind = ["flip", "truncate", "manifest", "swap", "faiss"][i % 5]
        mutate(kind)
        try:
            loaded = Document.load(path, model)
        except ValueError:
            outcomes[kind + " refused"] = outcomes.get(kind + " refused", 0) + 1
            continue
        assert torch.equal(loaded.ask(question, max_new_tokens=3, do_sample=False), expected), kind
        outcomes[kind + " loaded"] = outcomes.get(kind + " loaded", 0) + 1
    print(json.dumps(outcomes))
""")


def test_fuzzed_memory_files_load_identically_or_raise_value_error(tmp_path):
    """Hundreds of mutated files (byte flips, truncations, manifest edits, tensor swaps, Faiss bytes of another
    index; digests recomputed where an attacker without the key could): each loads with identical answers or raises
    ValueError. Run in a subprocess, so a segfault or abort fails the test."""
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ)
    proc = subprocess.run([sys.executable, str(script), os.path.dirname(__file__), str(tmp_path / "doc.memory"),
                           "300"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sum(outcomes.values()) == 300
    for kind in ("flip", "truncate", "manifest", "swap", "faiss"):
        assert outcomes.get(kind + " refused", 0) > 0, outcomes


def test_a_memory_key_signs_files_and_refuses_everything_else(tmp_path, monkeypatch):
    model = tiny_model(mem_layers=[1])
    doc = Document.read(model, torch.randint(3, 61, (1, 60)), progress=False)
    doc.save(tmp_path / "plain.memory")
    monkeypatch.setenv("KNN_LONGLLAMA_MEMORY_KEY", "alice's key")
    doc.save(tmp_path / "signed.memory")
    assert Document.load(tmp_path / "signed.memory", model).pending == doc.pending
    with pytest.raises(ValueError, match="not signed"):
        Document.load(tmp_path / "plain.memory", model)
    resign(tmp_path / "signed.memory")  # edited and re-hashed by someone without the key
    with pytest.raises(ValueError, match="not signed"):
        Document.load(tmp_path / "signed.memory", model)
    doc.save(tmp_path / "signed.memory")
    monkeypatch.setenv("KNN_LONGLLAMA_MEMORY_KEY", "mallory's key")
    with pytest.raises(ValueError, match="does not match its HMAC"):
        Document.load(tmp_path / "signed.memory", model)
    monkeypatch.delenv("KNN_LONGLLAMA_MEMORY_KEY")
    with pytest.raises(ValueError, match="signed with a key; set KNN_LONGLLAMA_MEMORY_KEY"):
        Document.load(tmp_path / "signed.memory", model)
