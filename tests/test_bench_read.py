"""experiments/bench_read.py: the floor and each memory spec read the same tokens, ratios against that floor."""

import pytest

pytestmark = pytest.mark.slow


def test_bench_read_measures_specs_against_the_bare_windows():
    from experiments import bench_read

    rows = bench_read.measure(1200, ["exact k=8", "IVF16,Flat k=8 nprobe=4 train=grow"], "cpu", floor_repeats=1)
    assert [r["memory_spec"] for r in rows] == ["bare windows", "exact k=8", "IVF16,Flat k=8 nprobe=4 train=grow"]
    floor = rows[0]["seconds"]
    for row in rows:
        assert row["tokens"] == 1200 and row["seconds"] > 0
        assert row["x_floor"] == pytest.approx(row["seconds"] / floor, rel=0.02, abs=0.01)
        assert row["cpu_seconds"] > 0
        assert row["x_floor_cpu"] == pytest.approx(row["cpu_seconds"] / rows[0]["cpu_seconds"], rel=0.02, abs=0.01)
    assert all(r["memory_mb"] > 0 and r["peak_rss_mb"] > 0 for r in rows[1:])
    with pytest.raises(SystemExit):
        bench_read.parse_args(["--tokens", "0"])


def test_bench_read_overrides_reach_the_model_with_memory_only():
    from experiments import bench_read

    full = bench_read.measure(1200, ["exact k=8"], "cpu", floor_repeats=1)
    one = bench_read.measure(1200, ["exact k=8"], "cpu", floor_repeats=1, overrides={"mem_layers": [0]})
    assert one[1]["settings"] == "mem_layers=[0]" and "settings" not in one[0]  # the floor has no memory anyway
    assert one[1]["memory_mb"] < full[1]["memory_mb"]
    args = bench_read.parse_args(["--set", "mem_distance=null", "mem_sink_tokens=0"])
    assert dict(args.set) == {"mem_distance": None, "mem_sink_tokens": 0}
    with pytest.raises(SystemExit):
        bench_read.parse_args(["--set", "mem_distance"])
