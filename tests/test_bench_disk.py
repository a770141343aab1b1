"""experiments/bench_disk.py: the 3B-shaped store and the demo read, disk against RAM, at a tiny size."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_store_case_disk_equals_ram_for_an_exact_index():
    from experiments import bench_disk

    cfg = dict(threads=1, memory="Flat k=8", ram_budget=1, dir=None, tokens=4096, queries=4, compare=True)
    ram, disk = (bench_disk.store_case(dict(cfg, mode=mode)) for mode in ("ram", "disk"))
    for key in ("ids", "scores", "values"):
        assert np.array_equal(ram[key], disk[key])
    assert ram["recall"] == disk["recall"] == 1.0  # Flat is exact
    assert disk["disk_gb"] == pytest.approx(3 * 4096 * 32 * 100 * 2 * 2 / 1e9, abs=0.01) and ram["disk_gb"] == 0
    assert all(r["add_tokens_per_s"] > 0 and r["build_peak_rss_mb"] > 0 for r in (ram, disk))


def test_read_case_gives_the_same_passkey_answers():
    from experiments import bench_disk

    cfg = dict(threads=1, memory="IVF16,Flat k=8 nprobe=16", ram_budget=16, tokens=1024, passkey_tokens=600,
               trials=1)
    ram, disk = (bench_disk.read_case(dict(cfg, mode=mode)) for mode in ("ram", "disk"))
    assert ram["passkey_generated"] == disk["passkey_generated"] and ram["passkey_trials"] == 1
    assert disk["disk_mb"] > 0 and ram["disk_mb"] == 0
    with pytest.raises(SystemExit):
        bench_disk.parse_args(["store", "--tokens", "0"])
