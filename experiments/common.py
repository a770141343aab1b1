"""What the experiments share: one results table, the environments table, timing, peak RSS and recall.

Every run appends to `results/results.csv`, a long-format table with one line per measured value: the experiment,
the run, the environment id, the settings that produced the value (a column each, empty where an experiment has no
such setting), the metric and its value. `results/environments.csv` describes each environment id once (machine,
packages, threads, demo checkpoint). `table(experiment)` reads an experiment back wide: a row per (run, settings),
a column per metric. The results page is a set of group-bys on these frames (`experiments/update_readme.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"  # every function's default `results` folder
ID_COLUMNS = ["experiment", "run", "env"]


def config_override(text: str) -> tuple[str, object]:
    """FIELD=VALUE of a `--set` option: the value parsed as JSON where it is JSON, else the text itself."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE (e.g. last_context_length=256), got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def overrides_text(overrides: dict) -> str:
    """Config overrides as one cell: `name=json_value` items separated by spaces ("" for none)."""
    return " ".join(f"{name}={json.dumps(value)}" for name, value in overrides.items())


def run_id(label: str | None = None) -> str:
    """A run's id: its label, or the time it started."""
    return label or time.strftime("%Y-%m-%dT%H:%M:%S")


def read_results(results: Path | None = None) -> pd.DataFrame:
    """The whole long table, every cell a string (empty where a setting does not apply)."""
    path = Path(results or RESULTS) / "results.csv"
    if not path.exists():
        return pd.DataFrame(columns=ID_COLUMNS + ["metric", "value"])
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on `folder`/.lock: runs that append at the same time take turns."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_rows(experiment: str, rows: list[dict], metrics: list[str], run: str, env: str,
                results: Path | None = None) -> None:
    """Append one run's `rows` (dicts of settings and metrics) to the table: a line per metric a row has; the
    row's other keys are its settings. Concurrent runs take turns (a lock file); the table is replaced atomically."""
    lines = [{"experiment": experiment, "run": run, "env": env,
              **{name: str(v) for name, v in row.items() if name not in metrics}, "metric": metric,
              "value": str(row[metric])} for row in rows for metric in metrics if metric in row]
    if not lines:
        return
    folder = Path(results or RESULTS)
    with _locked(folder):
        table = pd.concat([read_results(results), pd.DataFrame(lines, dtype=str)], ignore_index=True).fillna("")
        settings = [c for c in table.columns if c not in ID_COLUMNS + ["metric", "value"]]
        partial = folder / f".results.csv.{os.getpid()}"
        with open(partial, "w", newline="") as out:
            table[ID_COLUMNS + settings + ["metric", "value"]].to_csv(out, index=False)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, folder / "results.csv")


def table(experiment: str, results: Path | None = None) -> pd.DataFrame:
    """One experiment's values, wide: a row per (run, env, settings) in the table's order, a column per metric (a
    value measured again by the same run and settings: the last one); numeric columns parsed."""
    long = read_results(results)
    long = long[long["experiment"] == experiment]
    keys = [c for c in long.columns if c in ("run", "env") or
            c not in ("experiment", "metric", "value") and (long[c] != "").any()]
    rows = {}
    for record in long.to_dict("records"):
        key = tuple(record[c] for c in keys)
        rows.setdefault(key, dict(zip(keys, key)))[record["metric"]] = record["value"]
    frame = pd.DataFrame(list(rows.values()), columns=None if rows else keys)
    for column in frame.columns:
        given = frame[column].notna() & (frame[column] != "")
        parsed = pd.to_numeric(frame[column].where(given), errors="coerce")
        if parsed.notna().sum() == given.sum():
            frame[column] = parsed
    return frame


def model_identity() -> dict:
    """Which demo checkpoint made the numbers: sha256 of its weights (first 16 hex digits), window, memory layers."""
    from knn_longllama.demo import demo_path

    with open(os.path.join(demo_path(), "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    with open(os.path.join(demo_path(), "config.json")) as f:
        config = json.load(f)
    return {"weights_sha256": digest, "window": config["max_position_embeddings"],
            "mem_layers": json.dumps(config["mem_layers"])}


def environment(device: str = "cpu", threads: int | None = None, results: Path | None = None) -> str:
    """The id of this environment (machine, packages, device, threads, demo checkpoint), recorded in
    environments.csv the first time it is seen."""
    import faiss
    import torch
    import transformers

    record = {"python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
              "cpus": os.cpu_count(), "device": device, "threads": threads,
              "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else "",
              "torch": torch.__version__, "transformers": transformers.__version__, "faiss": faiss.__version__,
              "numpy": np.__version__, **model_identity()}
    env = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = Path(results or RESULTS) / "environments.csv"
    known = pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else pd.DataFrame(columns=["env"])
    if env not in set(known["env"]):
        path.parent.mkdir(parents=True, exist_ok=True)
        row = pd.DataFrame([{"env": env, **record}]).astype(str)
        pd.concat([known, row], ignore_index=True).fillna("").to_csv(path, index=False)
    return env


def environments(results: Path | None = None) -> pd.DataFrame:
    path = Path(results or RESULTS) / "environments.csv"
    return pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else pd.DataFrame(columns=["env"])


def median_seconds(fn, min_run_time: float = 1.0) -> tuple[float, int]:
    """Median seconds of a call of `fn` (torch.utils.benchmark: calibrated blocks after a warm-up, CUDA synchronized,
    the current torch threads) and how many blocks it measured."""
    import torch
    from torch.utils import benchmark

    measurement = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return measurement.median, len(measurement.times)


def timed(fn):
    """(fn(), seconds) of one call, CUDA synchronized before and after."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory in MiB. On Linux from /proc: getrusage's
    ru_maxrss survives fork + exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0; elsewhere nothing)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def recall(found, truth) -> float:
    """Share of the true neighbours found (faiss.contrib.evaluation.knn_intersection_measure): ids [..., k] each."""
    from faiss.contrib.evaluation import knn_intersection_measure

    found, truth = np.asarray(found), np.asarray(truth)
    return float(knn_intersection_measure(found.reshape(-1, found.shape[-1]), truth.reshape(-1, truth.shape[-1])))
