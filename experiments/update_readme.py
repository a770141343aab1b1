"""Regenerate the results pages from experiments/results/* (never typed by hand).

    python experiments/update_readme.py            # uses the `small` results, and `full` ones where present

Writes experiments/README.md, every generated table and plot (a complete generated file), and replaces everything
between the markers `<!-- results:begin -->` and `<!-- results:end -->` of the top-level README.md with a short
headline table that links to it.
"""

import csv
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
RESULTS_PAGE = os.path.join(ROOT, "experiments", "README.md")  # image and file links in it are relative to experiments/
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ORDER = ["passkey", "passkey_depth", "ingest", "decode", "recall"]
MIN_TRIALS = 20  # an accuracy goal is judged on at least this many trials (pooled over seeds)
DENSE = ("dense", "dense sdpa")  # run_experiments.py's dense-memory labels (official matmul; fused SDPA)
BENCHES = ["bench_forward_plain", "bench_forward_ingest", "bench_memory_overhead", "bench_memory_scaling",
           "bench_ivf_scan"]


def _tagged(name: str) -> list[str]:
    """Paths of results/<name>_<tag>.csv, the tagged runs of <name> (tags are letters, digits and underscores)."""
    return sorted(os.path.join(RESULTS, f) for f in os.listdir(RESULTS) if f.startswith(name + "_") and
                  f.endswith(".csv") and f[len(name) + 1:-4].replace("_", "").isalnum())


def _csv(name: str) -> list[dict]:
    """Rows of results/<name>.csv plus those of its tagged runs (e.g. a 1M-token spot check)."""
    rows = []
    for path in [os.path.join(RESULTS, name + ".csv")] + _tagged(name):
        if os.path.exists(path):
            with open(path) as f:
                rows += list(csv.DictReader(f))
    return rows


def _k(k: str) -> int:
    """A k column as a number for sorting (dense rows have "-")."""
    return int(k) if k.isdigit() else 0


def wilson_interval(correct: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate (95% for z = 1.96): how far `trials` trials pin the accuracy down."""
    p, n = correct / trials, trials
    centre, half = p + z * z / (2 * n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def _interval(correct: int, trials: int) -> str:
    low, high = wilson_interval(correct, trials)
    return f"{low:.0%}-{high:.0%}"


def _correct(row: dict) -> int:
    return round(float(row["accuracy"]) * int(row["trials"]))


def knn_vs_dense(rows: list[dict], trial_rows: list[dict] = ()) -> tuple:
    """The goal row "kNN accuracy >= dense wherever dense runs": each kNN (index, k, length) against dense on the
    same prompts, i.e. pooled over the seeds both ran at that length (a row without a seed column ran seed 0).
    Where a seed's dense and kNN runs differ in their number of trials, the trials both recorded (`trial_rows`, from
    passkey_trials_*.csv: trial i of a seed is the same prompt in every run) are compared one by one.
    Dense is the official "dense" where it ran, else "dense sdpa" (the same math read with fused SDPA)."""
    counts = {}  # (index, k, tokens, seed) -> [correct, trials]
    for r in rows:
        c = counts.setdefault((r["index"], r["k"], int(r["tokens"]), r.get("seed") or "0"), [0, 0])
        c[0] += _correct(r)
        c[1] += int(r["trials"])
    dense = {(n, seed): c for (i, _, n, seed), c in sorted(counts.items(), key=lambda item: item[0][0] == "dense")
             if i in DENSE}  # the official variant sorts last, so it wins where both ran
    if not dense:
        return ("kNN accuracy >= dense wherever dense runs", "dense not run at this scale", None)
    recorded = {}  # (index, k, tokens, seed) -> {trial: correct}
    for r in trial_rows:
        recorded.setdefault((r["index"], r["k"], int(r["tokens"]), r["seed"]), {})[int(r["trial"])] = int(r["correct"])
    dense_recorded = {}  # (tokens, seed) -> {trial: correct}, the official variant winning where both recorded
    for (i, _, n, seed), by_trial in sorted(recorded.items(), key=lambda item: item[0][0] == "dense"):
        if i in DENSE:
            dense_recorded[(n, seed)] = by_trial
    points = {}  # (index, k, tokens) -> [kNN correct, dense correct, trials]
    for (i, k, n, seed), (c, t) in counts.items():
        if i in DENSE or (n, seed) not in dense:
            continue
        d = dense[(n, seed)][0]
        if dense[(n, seed)][1] != t:  # compare the trials both recorded, if any
            mine, theirs = recorded.get((i, k, n, seed), {}), dense_recorded.get((n, seed), {})
            common = sorted(set(mine) & set(theirs))
            if not common:
                continue
            c, d, t = sum(mine[j] for j in common), sum(theirs[j] for j in common), len(common)
        p = points.setdefault((i, k, n), [0, 0, 0])
        p[0], p[1], p[2] = p[0] + c, p[1] + d, p[2] + t
    worse = [f"{i} k={k} at {n} ({c} vs {d} of {t})" for (i, k, n), (c, d, t) in sorted(points.items(),
             key=lambda item: (item[0][2], item[0][0])) if c < d]
    settings = {(i, k): True for i, k, _ in points}  # a kNN setting matches dense if it does at every length it ran
    for (i, k, _), (c, d, _) in points.items():
        settings[(i, k)] &= c >= d
    approximate = {(r["index"], r["k"], int(r["tokens"])) for r in rows if r.get("search") == "approximate"}
    searched = any("search" in r for r in rows)
    measured = ("no kNN point on dense's prompts" if not points else
                "everywhere" if not worse else "below dense: " + ", ".join(worse))
    if points:
        trials = "/".join(str(t) for t in sorted({t for *_, t in points.values()}))
        measured += f"; {trials} trials a point, the same prompts for both"
        if searched:
            measured += (f" ({len(approximate & set(points))} of {len(points)} kNN points there searched approximately; "
                         f"the others exactly, as Flat or as an index below its training size)")
    met = (not worse) if points else None
    if worse and any(settings.values()):  # some kNN settings meet it and some do not: say which
        ordered = sorted(settings.items(), key=lambda item: (item[0][0], _k(item[0][1])))
        names = {ok: ", ".join(f"{i} k={k}" for (i, k), good in ordered if good == ok) for ok in (True, False)}
        met = f"with {names[True]}; not with {names[False]}"
    return ("kNN accuracy >= dense wherever dense runs", measured, met)


def goal_rows(scale: str) -> list[tuple]:
    """The issue's goals against the measured numbers of one scale: (goal, measured, met) computed from the CSV
    files; met is True, False, None (not measured at this scale) or a sentence."""
    rows = []
    all_passkey = _csv(f"passkey_{scale}")
    passkey = [r for r in all_passkey if r["index"] not in DENSE]
    if passkey:
        longest = max(int(r["tokens"]) for r in passkey)
        pooled = {}  # (index, k) -> [correct, trials] at the longest length, over the runs (seeds) measuring it
        for r in passkey:
            if int(r["tokens"]) == longest:
                counts = pooled.setdefault((r["index"], r["k"]), [0, 0])
                counts[0] += _correct(r)
                counts[1] += int(r["trials"])
        (index, k), (correct, trials) = max(pooled.items(), key=lambda item: (item[1][0] / item[1][1], item[1][1]))
        verdict = None if longest < 2**20 else (f"too few trials to tell (fewer than {MIN_TRIALS})"
                                                if trials < MIN_TRIALS else correct / trials >= 0.95)
        rows.append(("passkey >= 95% at 1M tokens with a kNN index", f"{correct / trials:.0%} at {longest} tokens "
                     f"({index}, k={k}: {correct} of {trials} trials; 95% interval {_interval(correct, trials)})",
                     verdict))
        rows.append(knn_vs_dense(all_passkey, _csv(f"passkey_trials_{scale}")))
    ingest = _csv(f"ingest_{scale}")
    if ingest:
        seconds = {(r["index"], int(r["tokens"])): float(r["seconds"]) for r in ingest}
        ivf = [r["index"] for r in ingest if r["index"].startswith("IVF") and "PQ" not in r["index"]]
        dense = {}  # tokens -> (seconds, label) of the fastest dense variant ("dense", "dense sdpa") measured there
        for (i, m), s in seconds.items():
            if i in DENSE and (m not in dense or s < dense[m][0]):
                dense[m] = (s, i)
        common = sorted(m for m in dense if ivf and (ivf[0], m) in seconds)
        if common:
            n = common[-1]
            ratio = dense[n][0] / seconds[(ivf[0], n)]
            variants = sorted({i for (i, _) in seconds if i in DENSE})
            measured = f"{ratio:.1f}x at {n} tokens (largest length dense ran" + (
                f"; against {dense[n][1]}, the faster of {' and '.join(variants)})" if len(variants) > 1 else ")")
            longest = max(m for (i, m) in seconds if i == ivf[0])
            if longest > n:  # dense grows at least quadratically (every window attends to all memory)
                dense_estimate = dense[n][0] * (longest / n) ** 2
                measured += (f"; at {longest} tokens {ivf[0]} took {seconds[(ivf[0], longest)]:.0f} s, dense "
                             f"extrapolated quadratically ~{dense_estimate:.0f} s, so "
                             f"~{dense_estimate / seconds[(ivf[0], longest)]:.0f}x (not side by side)")
            rows.append(("ingestion at 1M tokens >= 20x faster with IVF than dense", measured,
                         None if n < 2**20 else ratio >= 20))
        exps = {r["index"]: float(r["time_exponent"]) for r in ingest
                if r["index"] not in DENSE and r["time_exponent"] != "-"}
        if exps:
            spans = {i: [int(r["tokens"]) for r in ingest if r["index"] == i] for i in exps}
            sub = [i for i, e in exps.items() if e < 2]
            met = len(sub) == len(exps) or (f"with {', '.join(sub)}; not with "
                                            f"{', '.join(i for i in exps if i not in sub)}" if sub else False)
            rows.append(("per-token ingestion cost sub-linear in context length (time exponent < 2)",
                         ", ".join(f"{i}: {e:.2f} ({min(spans[i])}-{max(spans[i])} tokens)" for i, e in exps.items()),
                         met))
    decode = [r for r in _csv(f"decode_{scale}") if r["index"] not in DENSE]
    if decode:
        largest = max(int(r["memory_tokens"]) for r in decode)
        ratios = {r["index"]: float(r["vs_smallest"]) for r in decode if int(r["memory_tokens"]) == largest}
        smallest = min(int(r["memory_tokens"]) for r in decode)
        rows.append(("decode latency with 1M tokens of memory <= 2x that with 1k",
                     f"at {largest} vs {smallest} tokens: " + ", ".join(f"{i} {v:.2f}x" for i, v in ratios.items()),
                     None if largest < 2**20 else min(ratios.values()) <= 2))
    return rows


VERDICT = {True: "yes", False: "no", None: "not measured at this scale"}


def goals(scale: str) -> str:
    """The issue's goals against the measured numbers of one scale (a table computed from the CSV files)."""
    rows = goal_rows(scale)
    if not rows:
        return ""
    lines = [f"**Goals (`--scale {scale}`)**", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {goal} | {measured} | {met if isinstance(met, str) else VERDICT[met]} |" for goal, measured, met in rows]
    return "\n".join(lines) + "\n"


def pooled_passkey(scale: str) -> str:
    """Passkey accuracy per (index, k, length) pooled over a base scale's runs (its tagged runs split the trials of a
    point over seeds and processes); empty when the scale has no tagged passkey run."""
    rows = _csv(f"passkey_{scale}")
    if not _tagged(f"passkey_{scale}") or not rows:
        return ""
    points = {}  # (index, k, tokens) -> [correct, trials, seeds, search]
    for r in rows:
        p = points.setdefault((r["index"], r["k"], int(r["tokens"])), [0, 0, set(), r.get("search", "-")])
        p[0] += _correct(r)
        p[1] += int(r["trials"])
        p[2].add(int(r.get("seed") or 0))
    lines = [f"**Passkey accuracy pooled over the `{scale}` runs (the tagged runs below and any untagged one; "
             "95% interval: Wilson score)**", "",
             "| index | k | tokens | search | correct | trials | accuracy | 95% interval | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(points, key=lambda key: (key[2], key[0] not in DENSE, key[0], _k(key[1])))
    for index, k, n in order:
        correct, trials, seeds, search = points[(index, k, n)]
        lines.append(f"| {index} | {k} | {n} | {search} | {correct} | {trials} | {correct / trials:.0%} | "
                     f"{_interval(correct, trials)} | {', '.join(map(str, sorted(seeds)))} |")
    return "\n".join(lines) + "\n"


DEPTH_BINS = 5  # equal bins of the key line's depth (share of the filler before it)


def depth_of_recorded_trials(scale: str) -> str:
    """Passkey accuracy by depth of the key line, binned over every recorded trial of a base scale's runs
    (passkey_trials_<scale>*.csv): a depth view at the lengths the length sweep ran, where a dedicated depth sweep
    would cost too much. Empty without trial records."""
    counts = {}  # (index, k, tokens) -> [[correct, trials] per bin]
    for r in _csv(f"passkey_trials_{scale}"):
        bins = counts.setdefault((r["index"], r["k"], int(r["tokens"])), [[0, 0] for _ in range(DEPTH_BINS)])
        cell = bins[min(int(float(r["depth"]) * DEPTH_BINS), DEPTH_BINS - 1)]
        cell[0] += int(r["correct"])
        cell[1] += 1
    if not counts:
        return ""
    edges = [f"{b / DEPTH_BINS:.1f}-{(b + 1) / DEPTH_BINS:.1f}" for b in range(DEPTH_BINS)]
    lines = [f"**Passkey trials by depth of the key line (`{scale}` runs with trial records; correct / trials)**", "",
             "| index | k | tokens | " + " | ".join(edges) + " |", "|---|---|---|" + "---|" * DEPTH_BINS]
    for (index, k, n), bins in sorted(counts.items(), key=lambda item: (item[0][2], item[0][0], _k(item[0][1]))):
        cells = " | ".join(f"{c}/{t}" if t else "-" for c, t in bins)
        lines.append(f"| {index} | {k} | {n} | {cells} |")
    return "\n".join(lines) + "\n"


def recall_summary(scale: str) -> str:
    """Retrieval quality at each index's own settings (the rows of recall_<scale>.csv outside the nprobe / efSearch
    sweeps): per text, recall@k against exact top-k, the share of exact top-k's attention mass the retrieved entries
    keep, and the search time. Empty without recall results."""
    path = os.path.join(RESULTS, f"recall_{scale}.csv")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["value"] == "-"]
    texts = list(dict.fromkeys(r["text"] for r in rows))
    points = {}  # (k, index, settings) -> {text: row}, in the file's order within each k
    for r in rows:
        params = {name: v for name, v in json.loads(r["param"]).items() if name != "faiss_metric"}
        settings = ", ".join([r["faiss_metric"]] + [f"{name} {v}" for name, v in params.items()])
        points.setdefault((int(r["k"]), r["index"], settings), {})[r["text"]] = r
    lines = ["At each index's own settings: recall@k against exact top-k, kept = share of exact top-k's attention "
             "mass the retrieved entries keep, ms = search time for all queries.", "",
             "| index | settings | k | " + " | ".join(f"{t} recall | {t} kept | {t} ms" for t in texts) + " |",
             "|---|---|---|" + "---|" * 3 * len(texts)]
    for (k, index, settings), by_text in sorted(points.items(), key=lambda item: item[0][0]):
        cells = []
        for t in texts:
            r = by_text.get(t)
            if r is None:
                cells += ["-"] * 3
                continue
            exact = float(r["mass_of_exact_topk"])
            kept = f"{float(r['attention_mass_kept']) / exact:.2f}" if exact else "-"
            cells += [f"{float(r['recall_at_k']):.2f}", kept, f"{float(r['search_ms']):.0f}"]
        lines.append(f"| {index} | {settings} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def current_model() -> dict:
    """Identity of the shipped demo checkpoint, as run_experiments records it."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        from run_experiments import model_identity
    finally:
        sys.path.pop(0)
    return model_identity()


def run_records(name: str) -> list[dict]:
    """Every run recorded in results/<name> (an environment_<scale>.json): one per experiment, plus the earlier runs
    a run with --append keeps (their rows stay in the same file)."""
    with open(os.path.join(RESULTS, name)) as f:
        records = json.load(f).values()
    return [run for record in records for run in [record, *record.get("earlier_runs", [])]]


def model_line(scale: str, current: dict) -> str:
    """Which demo checkpoint the scale's results were measured with, flagged when it is not the shipped one."""
    models = [run.get("model") for run in run_records(f"environment_{scale}.json")]
    if all(m == current for m in models):
        return f"Demo model: weights sha256 `{current['weights_sha256']}`, window {current['window']} (the shipped one).\n"
    other = {m["weights_sha256"]: m["window"] for m in models if m is not None and m != current}
    if not other:  # older records without the field
        return (f"Demo checkpoint not recorded for these runs (they predate the record); shipped: "
                f"`{current['weights_sha256']}`, window {current['window']}.\n")
    seen = ", ".join(f"`{sha}` (window {window})" for sha, window in sorted(other.items()))
    return (f"**Measured with another demo checkpoint than the shipped one** (weights {seen}; shipped: "
            f"`{current['weights_sha256']}`); rerun to refresh.\n")


def archives() -> str:
    """Links to archived result sets (experiments/results/archive/<name>/README.md, first line as the title)."""
    root = os.path.join(RESULTS, "archive")
    if not os.path.isdir(root):
        return ""
    lines = []
    for name in sorted(os.listdir(root)):
        readme = os.path.join(root, name, "README.md")
        if os.path.isfile(readme):
            with open(readme) as f:
                title = f.readline().strip().lstrip("# ")
            lines.append(f"- [`results/archive/{name}/`](results/archive/{name}/README.md): {title}")
    return "## Archived results\n\n" + "\n".join(lines) + "\n" if lines else ""


def scales() -> list[str]:
    """Scale names with results (from environment_<scale>.json): full first, then gpu, then small; tagged runs
    ("full_1m") after their base scale."""
    names = [f[len("environment_"):-len(".json")] for f in os.listdir(RESULTS)
             if f.startswith("environment_") and f.endswith(".json")]
    rank = {"full": 0, "gpu": 1, "small": 2}
    return sorted(names, key=lambda n: (rank.get(n.split("_")[0], 3), n))


def label_meanings(base: str) -> dict[str, set[str]]:
    """What each memory label of a base scale's runs (tagged ones too) stands for: the Faiss factory string and its
    settings, as the runs recorded them in environment_<scale>.json."""
    meaning = {}  # label -> set of "factory, settings"
    for f in sorted(os.listdir(RESULTS)):
        if f == f"environment_{base}.json" or (f.startswith(f"environment_{base}_") and f.endswith(".json")):
            for run in run_records(f):
                if run.get("scale", {}).get("dense"):
                    meaning["dense"] = {"attention to every memory entry (the official LongLLaMA memory)"}
                if run.get("scale", {}).get("dense_sdpa"):
                    meaning["dense sdpa"] = {"dense, read with one fused SDPA call over [local ; memory] keys "
                                             "(`torch_attention=True`)"}
                for label, (factory, params) in run.get("scale", {}).get("indices", {}).items():
                    settings = ", ".join(f"{name} {value}" for name, value in params.items())
                    meaning.setdefault(label, set()).add(f"`{factory}`" + (f", {settings}" if settings else ""))
    return meaning


def index_legend(base: str) -> str:
    """The memory labels of a base scale's runs and what they stand for (see label_meanings), as one line."""
    meaning = label_meanings(base)
    if not meaning:
        return ""
    return ("Memory labels: " + "; ".join(
        f"**{label}** = {' or '.join(sorted(m))}" for label, m in sorted(meaning.items())) + ".\n")


def _image(name: str) -> str:
    """A markdown image of results/<name>.png, relative to experiments/ (where the results page lives); empty
    when the plot does not exist."""
    if not os.path.exists(os.path.join(RESULTS, f"{name}.png")):
        return ""
    return f"![{name}](results/{name}.png)\n"


def scale_section(scale: str, found: list[str], current: dict) -> list[str]:
    """Markdown parts for one scale (or tagged run): the checkpoint line, for a base scale its goals and pooled
    passkey table (over its tagged runs too), then each experiment's table and plot."""
    level = "##" if "_" not in scale else "###"
    parts = [f"{level} Scaling experiments (`--scale {scale}`)\n", model_line(scale, current)]
    if "_" not in scale:
        parts += [table for table in (index_legend(scale), goals(scale), pooled_passkey(scale),
                                      depth_of_recorded_trials(scale)) if table]
    for name in found:
        with open(os.path.join(RESULTS, f"{name}_{scale}.md")) as f:
            table = f.read().strip() + "\n"
        if name == "recall":  # its title (what was measured on), the summary, then every sweep row folded
            title, rows = table.split("\n\n", 1)
            parts += [title + "\n", recall_summary(scale), "<details><summary>Every recall row (the nprobe / "
                      "efSearch / efConstruction sweeps)</summary>\n", rows, "</details>\n"]
        else:
            parts.append(table)
        plot = _image(f"{name}_{scale}")
        if plot:
            parts.append(plot)
    return parts


def _ranges(numbers: list[int]) -> str:
    """Sorted integers as a short list: runs of three or more written as ranges ("0-19", "2, 3, 7-9")."""
    spans = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if b - a >= 2 else ", ".join(map(str, range(a, b + 1))) for a, b in spans)


def seed_family(scale: str) -> str:
    """The experiment a tagged run belongs to: its name without a trailing `_seed<N>` (`--tag 1m_s3_seed4` is
    seed 4 of the `1m_s3` experiment)."""
    return re.sub(r"_seed\d+$", "", scale)


def seed_family_section(family: str, members: list[str], current: dict) -> list[str]:
    """One experiment run as several passkey-only tagged runs that differ in their seed: one table with a row per
    (run, index, k, length), each point pooled over the seeds below it (Wilson interval), and only the plots that
    show more than one length (a run of one point plots nothing its row does not say)."""
    rows = []
    for scale in members:
        with open(os.path.join(RESULTS, f"passkey_{scale}.csv")) as f:
            rows += [dict(r, run=scale) for r in csv.DictReader(f)]
    seeds = sorted({int(r.get("seed") or 0) for r in rows})
    suffixes = sorted(int(scale[len(family) + len("_seed"):]) for scale in members if scale != family)
    names = ([f"`{family}`"] if family in members else []) + [f"`{family}_seed<N>` (N = {_ranges(suffixes)})"]
    parts = [f"### Scaling experiments (`--scale {family}`, {len(members)} runs over seeds {_ranges(seeds)})\n",
             f"Runs {' and '.join(names)}: the same passkey experiment, one seed each.\n"]
    parts += list(dict.fromkeys(model_line(scale, current) for scale in members))
    lines = [f"**Passkey accuracy, one row per seed ({family}, every run)**", "",
             "| index | k | tokens | search | seed | correct | trials | seconds |", "|---|---|---|---|---|---|---|---|"]
    order = sorted(rows, key=lambda r: (int(r["tokens"]), r["index"] not in DENSE, r["index"], _k(r["k"]),
                                        int(r.get("seed") or 0)))
    points = {}  # (index, k, tokens) -> [correct, trials, runs]
    for r in order:
        lines.append(f"| {r['index']} | {r['k']} | {r['tokens']} | {r.get('search', '-')} | {r.get('seed') or 0} | "
                     f"{_correct(r)} | {r['trials']} | {r.get('seconds', '-')} |")
        p = points.setdefault((r["index"], r["k"], int(r["tokens"])), [0, 0, 0])
        p[0], p[1], p[2] = p[0] + _correct(r), p[1] + int(r["trials"]), p[2] + 1
    parts.append("\n".join(lines) + "\n")
    parts.append("Pooled over these runs (95% interval: Wilson score):\n\n" + "\n".join(
        f"- {index}{'' if k == '-' else f', k={k}'}, {n} tokens: {c} of {t} correct ({c / t:.0%}; 95% interval {_interval(c, t)}; {runs} runs)"
        for (index, k, n), (c, t, runs) in points.items()) + "\n")
    for scale in members:
        if len({r["tokens"] for r in rows if r["run"] == scale}) > 1:
            plot = _image(f"passkey_{scale}")
            if plot:
                parts.append(plot)
    return parts


def section() -> str:
    """Every generated table and plot (the body of experiments/README.md)."""
    parts = []
    current = current_model()
    with_results = {scale: [name for name in ORDER if os.path.exists(os.path.join(RESULTS, f"{name}_{scale}.md"))]
                    for scale in scales()}
    with_results = {scale: found for scale, found in with_results.items() if found}
    for base in dict.fromkeys(scale.split("_")[0] for scale in with_results):  # full, gpu, small (scales' order)
        runs = [scale for scale in with_results if scale.split("_")[0] == base]
        tagged = [scale for scale in runs if scale != base]
        if base in with_results:
            parts += scale_section(base, with_results[base], current)
        else:  # only tagged runs: their goals and pooled table still head the base scale
            parts += [f"## Scaling experiments (`--scale {base}`)\n"]
            parts += [table for table in (index_legend(base), goals(base), pooled_passkey(base),
                                          depth_of_recorded_trials(base)) if table]
        if tagged:  # folded: the goals and the pooled table above already count them
            families = {}  # experiment -> its tagged runs (runs differing only in their seed share one)
            for scale in tagged:
                families.setdefault(seed_family(scale), []).append(scale)
            parts.append(f"<details><summary>The {len(tagged)} tagged <code>{base}</code> runs, one table per "
                         f"experiment ({len(families)}; runs that differ only in their seed share one)</summary>\n")
            for family, members in families.items():
                if len(members) > 1 and all(with_results[scale] == ["passkey"] for scale in members):
                    parts += seed_family_section(family, members, current)
                else:
                    for scale in members:
                        parts += scale_section(scale, with_results[scale], current)
            parts.append("</details>\n")
    failures = sorted(f for f in os.listdir(RESULTS) if f.startswith("passkey_failures") and f.endswith(".md"))
    if failures:  # passkey_failures.md first, then its --key-line / --tag variants
        parts.append("## Where the demo model's passkey failures come from (`experiments/passkey_failures.py`)\n")
        for name in failures:
            with open(os.path.join(RESULTS, name)) as f:
                parts.append(f.read().strip() + "\n")
    archived = archives()
    if archived:
        parts.append(archived)
    bench = [name for name in BENCHES if os.path.exists(os.path.join(RESULTS, f"{name}.md"))]
    if bench:
        parts.append("## Benchmarks\n")
        for name in bench:
            with open(os.path.join(RESULTS, f"{name}.md")) as f:  # its headings below this page's "## Benchmarks"
                text = re.sub(r"^(#{1,4}) ", lambda m: "##" + m.group(1) + " ", f.read().strip(), flags=re.M)
                parts.append(f"`{name}`\n\n" + text + "\n")
            plot = _image(name)
            if plot:
                parts.append(plot)
    return "\n".join(parts) if parts else "No results yet: run `python experiments/run_experiments.py`.\n"


HEADLINE_KNN_COLUMNS = 3  # kNN settings beside dense in the headline table
HEADLINE_LENGTHS = 8  # at most this many lengths (rows) in it


def headline() -> str:
    """The short results table of the top-level README: passkey retrieval per length of the first scale with passkey
    results (full, else gpu, else small), pooled over its runs, dense beside exact Flat k=32 and the kNN settings
    measured at most lengths, each cell with its Wilson interval; then the scale's goals, one line each; then a link
    to experiments/README.md, where everything else is."""
    link = "Every table, plot and command: [experiments/README.md](experiments/README.md)."
    bases = list(dict.fromkeys(scale.split("_")[0] for scale in scales()))
    base = next((b for b in bases if _csv(f"passkey_{b}")), None)
    if base is None:
        return "No results yet: run `python experiments/run_experiments.py`.\n"
    counts = {}  # (index, k, tokens) -> [correct, trials]
    for r in _csv(f"passkey_{base}"):
        c = counts.setdefault((r["index"], r["k"], int(r["tokens"])), [0, 0])
        c[0], c[1] = c[0] + _correct(r), c[1] + int(r["trials"])
    lengths = {}  # kNN (index, k) -> lengths it ran at
    for i, k, n in counts:
        if i not in DENSE:
            lengths.setdefault((i, k), set()).add(n)
    exact = [s for s in lengths if s == ("Flat", "32")]
    others = sorted((s for s in lengths if s not in exact and len(lengths[s]) > 1),
                    key=lambda s: (-len(lengths[s]), s[0], _k(s[1])))
    columns = (exact + others)[:HEADLINE_KNN_COLUMNS] or sorted(lengths, key=lambda s: -len(lengths[s]))[:1]
    rows = sorted({n for i, k, n in counts if (i, k) in columns or i in DENSE})[-HEADLINE_LENGTHS:]

    def cell(c: list[int] | None, note: str = "") -> str:
        return "-" if c is None else f"{c[0]}/{c[1]} ({_interval(*c)}){note}"

    meaning = label_meanings(base)
    lines = [f"Passkey retrieval of the demo model (`--scale {base}` runs, pooled over seeds): correct / trials "
             "(95% Wilson interval); \"-\": not run at that length.", "",
             "| tokens | dense | " + " | ".join(f"{i} k={k}" for i, k in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for n in rows:
        dense = cell(counts[("dense", "-", n)]) if ("dense", "-", n) in counts else (
            cell(counts[("dense sdpa", "-", n)], " sdpa") if ("dense sdpa", "-", n) in counts else "-")
        lines.append(f"| {n} | {dense} | " + " | ".join(cell(counts.get((i, k, n))) for i, k in columns) + " |")
    shown = [label for label in [i for i, _ in columns] + (["dense sdpa"] if "sdpa |" in "\n".join(lines) else [])
             if label in meaning]
    notes = ["", "Labels: " + "; ".join(f"**{label}** = {' or '.join(sorted(meaning[label]))}" for label in shown)
             + "." if shown else ""]
    notes += ["", f"Goals of the `--scale {base}` runs (kNN against dense: on the same prompts only):", ""]
    notes += [f"- {goal}: {measured} (met: {met if isinstance(met, str) else VERDICT[met]})"
              for goal, measured, met in goal_rows(base)]
    lines += notes
    if any("(the shipped one)" not in model_line(scale, current_model()) for scale in scales()
           if scale.split("_")[0] == base):
        lines += ["", "**Some of these runs used another demo checkpoint than the shipped one** (see the results page)."]
    return "\n".join(lines + ["", link]) + "\n"


PAGE_HEADER = """# Experiment results

<!-- Generated by `python experiments/update_readme.py` from experiments/results/; do not edit by hand. -->

This file is generated by `python experiments/update_readme.py` from the CSV, markdown, PNG and JSON files in
[`results/`](results/), never typed by hand; the same script writes the headline table of the top-level
[README](../README.md). Advice on choosing an index and its settings, with these measurements: [docs/tuning.md](../docs/tuning.md).

## How these results are made

One command reruns every scaling experiment (passkey accuracy and depth sweep, ingestion time and peak RAM, decode
latency, recall and kept attention mass on real queries) and writes CSV, PNG and a markdown table per experiment
plus `environment_<scale>.json` (machine, package versions, settings), `passkey_trials_<scale>.csv` (every passkey
trial: seed, key, depth of the key line, what the model generated) and `printed_<scale>.txt` (what each run printed,
after its command line) into `experiments/results/`:

```bash
python experiments/run_experiments.py --scale small --threads 2   # under 10 min on 2 CPU cores (9.9 measured)
python experiments/run_experiments.py --scale full --threads 2    # 4k .. 1M tokens (many hours on 2 CPU cores)
python experiments/run_experiments.py --scale gpu --device cuda   # GPU variant: a few minutes on one GPU
python experiments/run_experiments.py --scale small --only passkey recall   # a subset
python experiments/run_experiments.py --scale full --only passkey --indices 'IVF1024,Flat l2' --lengths 1048576 \\
    --trials 1 --seed 1 --depths --tag 1m_s3_seed1 --threads 1   # one more 1M trial beside others; goals pool the seeds
python experiments/run_experiments.py --scale full --only passkey --indices dense Flat --ks 32 --lengths 65536 \\
    --trials 5 --seed 2 --depths --tag 64k_seed2 --threads 1   # dense beside exact top-32 on the same prompts
python experiments/run_experiments.py --scale full --only passkey --indices 'dense sdpa' --lengths 262144 \\
    --dense-max 262144 --trials 5 --seed 0 --depths --tag 262k_dense_seed0 --threads 1   # dense via fused SDPA
python experiments/run_experiments.py --scale full --only ingest --indices dense 'dense sdpa' \\
    --lengths 4096 16384 65536 --append   # re-time dense memory, official matmul beside fused SDPA
python experiments/bench_forward.py       # plain path vs transformers' LlamaForCausalLM; dense ingestion, matmul vs SDPA
python experiments/bench_memory.py        # the kNN store: library overhead, memory-layer time vs memory size
python experiments/bench_ivf_scan.py      # plain IVF search vs faiss.contrib.big_batch_search
python experiments/update_readme.py       # regenerate this file and the README's headline table
```

A tagged run (`--tag T`) writes `<experiment>_<scale>_T.*` beside the others; the goals and the pooled tables of a
scale count its tagged runs, and tagged runs that differ only in a `_seed<N>` suffix share one table below. The
passkey sweeps run one dense variant: the official matmul, or fused SDPA (the same math, faster to read) when only
`dense sdpa` is named; the kNN-vs-dense goal compares each kNN point with whichever ran on the same prompts. The
`gpu` scale runs the model and an exact top-k (`torch`) on the GPU and Faiss IVF on the GPU when `faiss-gpu` is
installed (on the CPU otherwise).
"""


def results_page() -> str:
    """The whole of experiments/README.md."""
    return PAGE_HEADER + "\n" + section()


def main(readme_path: str | None = None, page_path: str | None = None) -> None:
    readme_path = readme_path or os.path.join(ROOT, "README.md")
    page_path = page_path or RESULTS_PAGE
    with open(readme_path) as f:
        readme = f.read()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{readme_path} has no {BEGIN} ... {END} markers")
    with open(page_path, "w") as f:
        f.write(results_page())
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{headline()}{END}", readme,
                 flags=re.S)
    with open(readme_path, "w") as f:
        f.write(new)
    print(f"{os.path.relpath(page_path, ROOT)} regenerated; README headline table regenerated")


if __name__ == "__main__":
    main()
