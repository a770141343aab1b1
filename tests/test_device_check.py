"""experiments/device_check.py (run by experiments/device_check.sh on a GPU): every check on the CPU here, the CUDA
comparisons where a GPU exists."""

import subprocess
from pathlib import Path

import pytest
import torch

from experiments import common, device_check

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--keys", "3000", "--queries", "16", "--heads", "2", "--dim", "8", "--k", "4",
         "--ivf", "IVF16,Flat k=4 nprobe=16 metric=l2"]


def test_checks_pass_on_the_cpu_and_catch_a_difference(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    keys, values, queries = device_check.random_data(3000, 16, 2, 8)
    exact = device_check.check_exact("cpu", keys, values, queries, 4)
    assert exact["same_ids"] == 1.0 and exact["max_score_diff"] == 0.0
    ivf = device_check.check_ivf("cpu", "IVF16,Flat k=4 nprobe=16 metric=l2", keys, values, queries, 4)
    assert ivf["recall_cpu"] == ivf["recall_device"] == 1.0  # every list probed: the exact top-4
    assert ivf["faiss_gpu"] is False
    assert device_check.failures([exact, ivf], 0.03) == []
    worse = dict(ivf, recall_device=0.9)
    assert len(device_check.failures([dict(exact, same_ids=0.5), worse], 0.03)) == 2
    assert device_check.read_specs(["exact k=8", "IVF16,Flat k=8"], "cpu") == ["exact k=8", "IVF16,Flat k=8"]


@pytest.mark.slow
def test_main_records_checks_and_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert device_check.main(["--device", "cpu", *SMALL, "--tokens", "1100", "--memory", "exact k=8",
                              "--run", "t"]) == 0
    checks, reads = common.table("device_check", tmp_path), common.table("bench_read", tmp_path)
    assert set(checks["check"]) == {"exact", "ivf"} and (checks["run"] == "t").all()
    assert list(reads["memory_spec"]) == ["bare windows", "exact k=8"] and (reads["tokens"] == 1100).all()


def test_bad_arguments_exit_with_usage():
    for argv in (["--keys", "0"], ["--k", "50", "--keys", "10"], ["--recall-tol", "-1"]):
        with pytest.raises(SystemExit):
            device_check.parse_args(argv)


def test_the_script_is_valid_bash_and_skips_without_a_gpu():
    script = ROOT / "experiments" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run the checks")
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no CUDA GPU" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_exact_topk_equals_the_cpu_one_and_ivf_recall_matches():
    keys, values, queries = device_check.random_data(20000, 64, 2, 32)
    exact = device_check.check_exact("cuda", keys, values, queries, 32)
    ivf = device_check.check_ivf("cuda", "IVF256,Flat k=32 nprobe=32 metric=l2", keys, values, queries, 32)
    assert device_check.failures([exact, ivf], 0.03) == []
