"""Regenerate the results page and the README's headline table from the results table (never typed by hand).

    python experiments/update_readme.py     # or: python -m experiments.update_readme

Every table is a group-by of experiments/results/results.csv (see experiments/common.py) rendered to markdown, and
every plot is drawn from the same frames into experiments/results/*.png. Writes experiments/README.md and replaces
everything between the markers `<!-- results:begin -->` and `<!-- results:end -->` of the top-level README.md with
a short headline table that links to it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

try:
    from experiments import common
except ModuleNotFoundError:  # run as a script, `python experiments/update_readme.py`: common.py sits beside it
    import common

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
MIN_TRIALS = 20  # an accuracy goal is judged on at least this many trials (pooled over seeds)
DENSE = ("dense", "dense sdpa")  # run_experiments.py's dense-memory labels (official matmul; fused SDPA)
SCALES = ("full", "gpu", "small")  # the order of the page's sections
DEPTH_BINS = 5  # equal bins of the key line's depth (share of the filler before it)
HEADLINE_KNN_COLUMNS, HEADLINE_LENGTHS = 3, 8  # kNN settings beside dense, and lengths, in the headline table
KNN_GOAL = "kNN accuracy >= dense wherever dense runs"
VERDICT = {True: "yes", False: "no", None: "not measured at this scale"}


# -- reading and rendering -----------------------------------------------------------------------------------------
def frame(experiment: str, scale: str | None = None, points: list[str] | None = None) -> pd.DataFrame:
    """An experiment's rows (of one scale); with `points`, a point measured by several runs counts once: the last."""
    table = common.table(experiment)
    if table.empty:
        return table
    if "k" in table:
        table["k"] = table["k"].astype(str)  # a number, or "-" for dense memory
    if scale is not None:
        table = table[table["scale"] == scale]
    return table.drop_duplicates(points, keep="last") if points else table


def k_number(k) -> int:
    return int(k) if str(k).isdigit() else 0


def wilson_interval(correct: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate (95% for z = 1.96): how far `trials` trials pin the accuracy down."""
    p, n = correct / trials, trials
    centre, half = p + z * z / (2 * n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def interval(correct: int, trials: int) -> str:
    low, high = wilson_interval(correct, trials)
    return f"{low:.0%}-{high:.0%}"


def markdown(table: pd.DataFrame, title: str = "") -> str:
    """`table` as a compact markdown table (pandas' to_markdown, numbers to 4 significant digits; missing: "-")."""
    table = table.copy()
    for column in table.columns:
        table[column] = [v if isinstance(v, str) else "-" if pd.isna(v) else f"{v:.4g}" if isinstance(v, float)
                         else str(v) for v in table[column]]
    lines = table.to_markdown(index=False, tablefmt="github", disable_numparse=True).splitlines()
    lines = ["| " + " | ".join(cell.strip() for cell in line.strip("|").split("|")) + " |" for line in lines]
    lines[1] = "|" + "---|" * len(table.columns)
    return (f"**{title}**\n\n" if title else "") + "\n".join(lines) + "\n"


def plot(name: str, panels: list[dict]) -> str:
    """Draw results/<name>.png, panels side by side (each: title, x, y labels, series {name: (xs, ys)}, logx, logy)
    and return the page's image link (relative to experiments/)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(panels), 2)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for label, (xs, ys) in panel["series"].items():
            ax.plot(xs, ys, "o-", label=label)
        ax.set(title=panel["title"], xlabel=panel["x"], ylabel=panel["y"])
        if panel.get("logx"):
            ax.set_xscale("log", base=panel["logx"])
        ys = [y for _, ys in panel["series"].values() for y in ys]
        if panel.get("logy") and all(y > 0 for y in ys):  # a time rounded to 0 s keeps a linear axis
            ax.set_yscale("log")
        if panel.get("hline"):
            ax.axhline(panel["hline"], color="gray", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(common.RESULTS / f"{name}.png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return f"![{name}](results/{name}.png)\n"


def series(table: pd.DataFrame, by: list[str], x: str, y: str) -> dict:
    """{label: (xs, ys)} of `table`, a line per group of `by` (joined by spaces), points sorted by x."""
    return {" ".join(str(v) for v in (key if isinstance(key, tuple) else (key,)) if v not in ("-", "")):
            (part.sort_values(x)[x].tolist(), part.sort_values(x)[y].tolist())
            for key, part in table.groupby(by, sort=False)}


# -- passkey: pooling and goals ------------------------------------------------------------------------------------
def passkey_points(scale: str) -> pd.DataFrame:
    """Passkey points (index, k, tokens, seed) of a scale; a point measured again counts once (its last run)."""
    return frame("passkey", scale, ["index", "k", "tokens", "seed"])


def pooled(points: pd.DataFrame) -> pd.DataFrame:
    """Correct and trials per (index, k, tokens), pooled over seeds; dense first at each length, then by name, k."""
    table = points.groupby(["index", "k", "tokens"], sort=False).agg(
        search=("search", "first"), correct=("correct", "sum"), trials=("trials", "sum"),
        seeds=("seed", lambda s: ", ".join(map(str, sorted(set(s)))))).reset_index()
    order = table.assign(knn=~table["index"].isin(DENSE), knum=table["k"].map(k_number))
    return table.loc[order.sort_values(["tokens", "knn", "index", "knum"]).index]


def knn_vs_dense(points: pd.DataFrame, trials: pd.DataFrame) -> tuple:
    """The goal row "kNN accuracy >= dense wherever dense runs": each kNN (index, k, length) against dense on the
    same prompts, i.e. pooled over the seeds both ran at that length. Where a seed's dense and kNN runs differ in
    their number of trials, the trials both recorded (trial i of a seed is the same prompt in every run) are compared
    one by one. Dense is the official "dense" where it ran, else "dense sdpa" (the same math read with fused SDPA)."""
    counts = {(r["index"], r["k"], r["tokens"], r["seed"]): (r["correct"], r["trials"]) for _, r in points.iterrows()}
    by_official = lambda item: item[0][0] == "dense"  # noqa: E731 (the official variant sorts last: it wins)
    dense = {(n, s): c for (i, _, n, s), c in sorted(counts.items(), key=by_official) if i in DENSE}
    if not dense:
        return (KNN_GOAL, "dense not run at this scale", None)
    recorded = {}  # (index, k, tokens, seed) -> {trial: correct}
    for _, r in trials.iterrows():
        recorded.setdefault((r["index"], r["k"], r["tokens"], r["seed"]), {})[r["trial"]] = r["correct"]
    dense_recorded = {(n, s): t for (i, _, n, s), t in sorted(recorded.items(), key=by_official) if i in DENSE}
    compared = {}  # (index, k, tokens) -> [kNN correct, dense correct, trials]
    for (i, k, n, s), (c, t) in counts.items():
        if i in DENSE or (n, s) not in dense:
            continue
        d = dense[(n, s)][0]
        if dense[(n, s)][1] != t:  # compare the trials both recorded, if any
            mine, theirs = recorded.get((i, k, n, s), {}), dense_recorded.get((n, s), {})
            common_trials = sorted(set(mine) & set(theirs))
            if not common_trials:
                continue
            c, d, t = (sum(mine[j] for j in common_trials), sum(theirs[j] for j in common_trials),
                       len(common_trials))
        p = compared.setdefault((i, k, n), [0, 0, 0])
        p[0], p[1], p[2] = p[0] + c, p[1] + d, p[2] + t
    if not compared:
        return (KNN_GOAL, "no kNN point on dense's prompts", None)
    worse = [f"{i} k={k} at {n} ({c} vs {d} of {t})" for (i, k, n), (c, d, t)
             in sorted(compared.items(), key=lambda item: (item[0][2], item[0][0])) if c < d]
    meets = {}  # a kNN setting meets the goal if it does at every length it ran
    for (i, k, _), (c, d, _) in compared.items():
        meets[(i, k)] = meets.get((i, k), True) and c >= d
    approximate = {(r["index"], r["k"], r["tokens"]) for _, r in points.iterrows() if r["search"] == "approximate"}
    measured = "everywhere" if not worse else "below dense: " + ", ".join(worse)
    measured += (f"; {'/'.join(str(t) for t in sorted({t for *_, t in compared.values()}))} trials a point, the same "
                 f"prompts for both ({len(approximate & set(compared))} of {len(compared)} kNN points there searched "
                 "approximately; the others exactly, as Flat or as an index below its training size)")
    met = not worse
    if worse and any(meets.values()):  # some kNN settings meet it and some do not: say which
        ordered = sorted(meets.items(), key=lambda item: (item[0][0], k_number(item[0][1])))
        names = {ok: ", ".join(f"{i} k={k}" for (i, k), good in ordered if good == ok) for ok in (True, False)}
        met = f"with {names[True]}; not with {names[False]}"
    return (KNN_GOAL, measured, met)


def ingest_points(scale: str) -> pd.DataFrame:
    """Ingestion points with us_per_token and each label's fitted exponent of time in tokens ("-": one point)."""
    table = frame("ingest", scale, ["index", "tokens"])
    if table.empty:
        return table
    table = table.assign(us_per_token=(1e6 * table["seconds"] / table["tokens"]).round(2))
    exponents = {label: round(float(np.polyfit(np.log(part["tokens"]), np.log(part["seconds"]), 1)[0]), 2)
                 for label, part in table.groupby("index") if len(part) >= 2}
    return table.assign(time_exponent=table["index"].map(lambda label: exponents.get(label, "-")))


def decode_points(scale: str) -> pd.DataFrame:
    """Decode points, each with its latency over that of the same label's smallest memory."""
    table = frame("decode", scale, ["index", "tokens"])
    if table.empty:
        return table
    table = table.sort_values("tokens", kind="stable").sort_values("index", key=lambda s: s.map(
        {label: i for i, label in enumerate(dict.fromkeys(table["index"]))}), kind="stable")
    return table.assign(vs_smallest=(table["ms_per_token"] / table.groupby("index")["ms_per_token"].transform("first"))
                        .round(2))


def goal_rows(scale: str) -> list[tuple]:
    """The issue's goals against one scale's measurements: (goal, measured, met), met True, False, None (not
    measured at this scale) or a sentence."""
    rows = []
    points = passkey_points(scale)
    knn = pooled(points[~points["index"].isin(DENSE)]) if not points.empty else points
    if not knn.empty:
        longest = knn["tokens"].max()
        best = knn[knn["tokens"] == longest].assign(acc=lambda t: t["correct"] / t["trials"]).sort_values(
            ["acc", "trials"], kind="stable").iloc[-1]
        c, t = int(best["correct"]), int(best["trials"])
        verdict = None if longest < 2**20 else (f"too few trials to tell (fewer than {MIN_TRIALS})"
                                                if t < MIN_TRIALS else c / t >= 0.95)
        rows.append(("passkey >= 95% at 1M tokens with a kNN index", f"{c / t:.0%} at {longest} tokens "
                     f"({best['index']}, k={best['k']}: {c} of {t} trials; 95% interval {interval(c, t)})", verdict))
        trials = frame("passkey_trial", scale, ["index", "k", "tokens", "seed", "trial"])
        rows.append(knn_vs_dense(points, trials))
    ingest = ingest_points(scale)
    if not ingest.empty:
        seconds = {(r["index"], r["tokens"]): r["seconds"] for _, r in ingest.iterrows()}
        ivf = [i for i in dict.fromkeys(ingest["index"]) if i.startswith("IVF") and "PQ" not in i]
        dense = {}  # tokens -> (seconds, label) of the faster dense variant measured there
        for (i, n), s in seconds.items():
            if i in DENSE and (n not in dense or s < dense[n][0]):
                dense[n] = (s, i)
        common_lengths = sorted(n for n in dense if ivf and (ivf[0], n) in seconds)
        if common_lengths:
            n = common_lengths[-1]
            ratio = dense[n][0] / seconds[(ivf[0], n)]
            variants = sorted({i for i, _ in seconds if i in DENSE})
            measured = f"{ratio:.1f}x at {n} tokens (largest length dense ran" + (
                f"; against {dense[n][1]}, the faster of {' and '.join(variants)})" if len(variants) > 1 else ")")
            longest = max(m for i, m in seconds if i == ivf[0])
            if longest > n:  # dense grows at least quadratically (every window attends to all memory)
                estimate = dense[n][0] * (longest / n) ** 2
                measured += (f"; at {longest} tokens {ivf[0]} took {seconds[(ivf[0], longest)]:.0f} s, dense "
                             f"extrapolated quadratically ~{estimate:.0f} s, so "
                             f"~{estimate / seconds[(ivf[0], longest)]:.0f}x (not side by side)")
            rows.append(("ingestion at 1M tokens >= 20x faster with IVF than dense", measured,
                         None if n < 2**20 else ratio >= 20))
        fitted = ingest[~ingest["index"].isin(DENSE) & (ingest["time_exponent"] != "-")]
        spans = fitted.groupby("index", sort=False).agg(e=("time_exponent", "first"), low=("tokens", "min"),
                                                          high=("tokens", "max"))
        if not spans.empty:
            sub = [i for i, e in spans["e"].items() if e < 2]
            met = len(sub) == len(spans) or (f"with {', '.join(sub)}; not with "
                                             f"{', '.join(i for i in spans.index if i not in sub)}" if sub else False)
            rows.append(("per-token ingestion cost sub-linear in context length (time exponent < 2)",
                         ", ".join(f"{r.Index}: {r.e:.2f} ({r.low}-{r.high} tokens)" for r in spans.itertuples()), met))
    decode = decode_points(scale)
    decode = decode[~decode["index"].isin(DENSE)] if not decode.empty else decode
    if not decode.empty:
        largest, smallest = decode["tokens"].max(), decode["tokens"].min()
        at = decode[decode["tokens"] == largest]
        rows.append(("decode latency with 1M tokens of memory <= 2x that with 1k",
                     f"at {largest} vs {smallest} tokens: " + ", ".join(f"{r['index']} {r['vs_smallest']:.2f}x"
                                                                       for _, r in at.iterrows()),
                     None if largest < 2**20 else at["vs_smallest"].min() <= 2))
    return rows


def verdict(met) -> str:
    return met if isinstance(met, str) else VERDICT[met]


def goals(scale: str) -> str:
    rows = goal_rows(scale)
    table = pd.DataFrame([(g, m, verdict(v)) for g, m, v in rows], columns=["goal", "measured", "met"])
    return markdown(table, f"Goals (`--scale {scale}`)") if rows else ""


# -- tables of a scale -----------------------------------------------------------------------------------------------
def labels(scale: str) -> dict[str, list[str]]:
    """What each memory label of a scale's rows stands for: its memory specs (k is a column of its own)."""
    specs = {}
    for experiment in ("passkey", "ingest", "decode"):
        table = frame(experiment, scale)
        for label, spec in zip(table.get("index", []), table.get("memory_spec", [])):
            spec = "dense, read with one fused SDPA call (`torch_attention=True`)" if label == "dense sdpa" else (
                "attention to every memory entry (the official LongLLaMA memory)" if spec == "dense" else
                f"`{re.sub(r' k=[0-9]+', '', spec)}`")
            specs.setdefault(label, []).append(spec)
    return {label: sorted(set(s)) for label, s in specs.items()}


def legend(scale: str, only: list[str] | None = None) -> str:
    meaning = labels(scale)
    shown = sorted(meaning) if only is None else [label for label in only if label in meaning]
    return "; ".join(f"**{label}** = {' or '.join(meaning[label])}" for label in shown)


def depth_of_recorded_trials(scale: str) -> str:
    """Passkey accuracy by depth of the key line, binned over every recorded trial of a scale: a depth view at the
    lengths the length sweep ran, where a dedicated depth sweep would cost too much."""
    trials = frame("passkey_trial", scale, ["index", "k", "tokens", "seed", "trial"])
    if trials.empty:
        return ""
    edges = [f"{b / DEPTH_BINS:.1f}-{(b + 1) / DEPTH_BINS:.1f}" for b in range(DEPTH_BINS)]
    bins = [edges[min(int(depth * DEPTH_BINS), DEPTH_BINS - 1)] for depth in trials["depth"]]
    trials = trials.assign(bin=pd.Categorical(bins, categories=edges))
    cells = trials.groupby(["tokens", "index", "k", "bin"], observed=False)["correct"].agg(["sum", "count"])
    cells = cells[cells.groupby(level=[0, 1, 2])["count"].transform("sum") > 0]
    text = cells.apply(lambda r: f"{r['sum']}/{r['count']}" if r["count"] else "-", axis=1).unstack("bin")
    text = text.reset_index()
    text = text.loc[text.assign(knum=text["k"].map(k_number)).sort_values(["tokens", "index", "knum"]).index]
    return markdown(text[["index", "k", "tokens", *edges]], f"Passkey trials by depth of the key line (`{scale}` runs "
                    "with trial records; correct / trials)")


def recall_section(scale: str) -> list[str]:
    table = frame("recall", scale, ["text", "index", "k", "memory_spec", "sweep", "sweep_value"])
    if table.empty:
        return []
    keys = ", ".join(f"{text}: {n}" for text, n in table.groupby("text", sort=False)["memory_keys"].first().items())
    own = table[table["sweep"].fillna("") == ""]
    cells = {}  # (k, index, memory spec) -> {column: formatted value}, texts side by side
    for _, r in own.iterrows():
        cell = cells.setdefault((r["k"], r["index"], r["memory_spec"]), {})
        cell[f"{r['text']} recall"] = f"{r['recall_at_k']:.2f}"
        cell[f"{r['text']} kept"] = f"{r['attention_mass_kept'] / r['mass_of_exact_topk']:.2f}"
        cell[f"{r['text']} ms"] = f"{r['search_ms']:.0f}"
    summary = pd.DataFrame.from_dict(cells, orient="index").fillna("-").rename_axis(["k", "index", "memory spec"])
    summary = summary.reset_index().sort_values("k", key=lambda k: k.map(k_number), kind="stable")
    swept = table[table["sweep"].isin(["nprobe", "efSearch"]) & (table["k"] == "32")]
    return [markdown(summary, f"Retrieval quality on real keys and queries of the first memory layer ({keys} keys "
                     "per head; the queries of the last window): recall@k against exact top-k, kept = share of "
                     "exact top-k's attention mass the retrieved entries keep, ms = search time for all queries"),
            "<details><summary>Every recall row (the nprobe / efSearch / efConstruction sweeps)</summary>\n",
            markdown(table.drop(columns=["scale", "run", "env"])), "</details>\n",
            plot(f"recall_{scale}", [dict(title="Recall against exact top-32 (real queries)", x="nprobe / efSearch",
                                          y="recall@32", logx=2, series=series(swept, ["index", "text"],
                                                                               "sweep_value", "recall_at_k"))])]


def scale_section(scale: str) -> list[str]:
    """One scale: checkpoint, labels, goals, passkey pooled and per run, depth, ingest, decode, recall."""
    parts = [f"## Scaling experiments (`--scale {scale}`)\n", model_line(scale)]
    meaning = legend(scale)
    parts += [f"Memory labels: {meaning}.\n" if meaning else "", goals(scale)]
    points = passkey_points(scale)
    if not points.empty:
        table = pooled(points).assign(accuracy=lambda t: (t["correct"] / t["trials"]).map("{:.0%}".format))
        table["95% interval"] = [interval(c, t) for c, t in zip(table["correct"], table["trials"])]
        parts.append(markdown(table[["index", "k", "tokens", "search", "correct", "trials", "accuracy",
                                     "95% interval", "seeds"]],
                              f"Passkey accuracy pooled over the `{scale}` runs (95% interval: Wilson score)"))
        lines = pooled(points).assign(acc=lambda t: t["correct"] / t["trials"], setting=lambda t: [
            i if k == "-" else f"{i} k={k}" for i, k in zip(t["index"], t["k"])])
        parts.append(plot(f"passkey_{scale}", [dict(title="Passkey retrieval, demo model", x="context tokens",
                                                    y="passkey accuracy", logx=2,
                                                    series=series(lines, ["setting"], "tokens", "acc"))]))
        parts.append(depth_of_recorded_trials(scale))
        runs = points.assign(knum=points["k"].map(k_number), knn=~points["index"].isin(DENSE)).sort_values(
            ["tokens", "knn", "index", "knum", "seed"])
        parts += [f"<details><summary>Passkey accuracy, one row per run ({runs['run'].nunique()} runs)</summary>\n",
                  markdown(runs[[c for c in ("run", "index", "k", "tokens", "search", "seed", "correct", "trials",
                                             "seconds") if c in runs]]),
                  "</details>\n"]
    depth = frame("passkey_depth", scale, ["index", "tokens", "depth"])
    if not depth.empty:
        depth = depth.assign(accuracy=depth["correct"] / depth["trials"])
        parts.append(markdown(depth[["index", "k", "tokens", "depth", "correct", "trials", "accuracy"]],
                              "Passkey accuracy vs depth of the key"))
    ingest = ingest_points(scale)
    if not ingest.empty:
        columns = ["index", "tokens", "search", "seconds", "us_per_token", "peak_rss_mb", "memory_mb", "time_exponent"]
        parts += [markdown(ingest[columns + [c for c in ["peak_gpu_mb"] if c in ingest]],
                           f"Ingestion time and peak RAM vs context length ({scale}); time ~ tokens^exponent"),
                  plot(f"ingest_{scale}", [dict(title="Reading into memory", x="context tokens", logx=2, logy=True,
                                                y="ingestion time (s)",
                                                series=series(ingest, ["index"], "tokens", "seconds"))])]
    decode = decode_points(scale)
    if not decode.empty:
        parts += [markdown(decode[["index", "tokens", "ms_per_token", "read_seconds", "peak_rss_mb", "vs_smallest"]],
                           f"Decode latency per generated token vs memory tokens ({scale}, median of 20 steps; "
                           "read_seconds: reading the memory first)"),
                  plot(f"decode_{scale}", [dict(title="Decode latency", x="memory tokens", logx=2,
                                                y="ms per generated token",
                                                series=series(decode, ["index"], "tokens", "ms_per_token"))])]
    return [part for part in parts + recall_section(scale) if part]


def model_line(scale: str) -> str:
    """Which demo checkpoint the scale's rows were measured with, flagged when it is not the shipped one."""
    current = common.model_identity()
    sha, window = current["weights_sha256"], current["window"]
    envs = set().union(*(set(frame(e, scale).get("env", [])) for e in ("passkey", "ingest", "decode", "recall")))
    known = common.environments()
    shas = set(known[known["env"].isin(envs)]["weights_sha256"])
    if shas == {sha}:
        return f"Demo model: weights sha256 `{sha}`, window {window} (the shipped one).\n"
    other = ", ".join(f"`{s}`" for s in sorted(shas - {sha, ""})) or "not recorded"
    return f"**Measured with another demo checkpoint than the shipped one** (weights {other}; shipped: `{sha}`).\n"


# -- failures, benchmarks, archives ----------------------------------------------------------------------------------
def failures_section() -> list[str]:
    parts = []
    table = frame("passkey_failure")
    groups = [] if table.empty else table.groupby(["run", "key_line", "window"], sort=False)
    for (run, key_line, window), part in groups:
        counts = {}  # trials and correct ones per length, on either side of each split
        for (yes, no), chosen in {("key line in one window", "key line cut"): part["line_whole"] == 1,
                                  ("copies in one window", "copies apart"): part["copies_together"] == 1,
                                  ("each copy whole", "a copy cut"): part["whole_copies"] == part["copies"]}.items():
            for label, rows in ((yes, part[chosen]), (no, part[~chosen])):
                by_length = rows.groupby("tokens")["correct"]
                counts[label], counts[f"correct ({label})"] = by_length.count(), by_length.sum()
        rows = pd.DataFrame(counts).reindex(sorted(part["tokens"].unique())).fillna(0).astype(int).reset_index()
        parts.append(markdown(rows.rename(columns={"index": "tokens"}), f"Passkey accuracy of the demo model by where "
                              f"window boundaries fall ({run}: window {window}, dense memory, key line {key_line}, "
                              f"{part.groupby('tokens').size().max()} trials per length)"))
    recorded = frame("passkey_failure_recorded")
    for (run, window), part in [] if recorded.empty else recorded.groupby(["run", "window"], sort=False):
        quarter = window // 4
        edges = [f"{q * quarter}-{(q + 1) * quarter - 1}" for q in range(4)]
        place = part["window_position"].map(lambda p: "local" if p == "local" else edges[int(p) // quarter])
        cells = {}
        for (index, k, n), point in part.assign(place=place).groupby(["index", "k", "tokens"], sort=False):
            cell = lambda rows: f"{rows['correct'].sum()}/{len(rows)}" if len(rows) else "-"  # noqa: E731
            cells[(index, k, n)] = {**{e: cell(point[point["place"] == e]) for e in edges + ["local"]},
                                    "key line cut": cell(point[point["line_whole"] == 0])}
        rows = pd.DataFrame.from_dict(cells, orient="index").rename_axis(["index", "k", "tokens"]).reset_index()
        rows = rows.loc[rows.assign(knum=rows["k"].map(k_number)).sort_values(["tokens", "index", "knum"]).index]
        parts.append(markdown(rows, f"Where the key line sat in its window, recorded "
                              f"passkey trials ({run}: window {window}, no model run; correct / trials by the position "
                              "of the key line's first token in its window; local: the final local context)"))
    return ["## Where the demo model's passkey failures come from (`python -m experiments.passkey_failures`)\n",
            *parts] if parts else []


def ruler_section() -> list[str]:
    """RULER-style scores of real models (`python -m experiments.ruler`): per (model, setting, task, length) the mean
    string_match_all score over the samples measured (a sample measured again counts once: its last run), the
    average over the tasks measured at that length, and a plot of the average against length."""
    from knn_longllama.ruler import TASKS

    samples = frame("ruler_sample", points=["model", "setting", "task", "tokens", "seed", "sample"])
    if samples.empty:
        return []
    samples = samples.assign(score=100 * samples["score"])
    cells = samples.groupby(["model", "setting", "tokens", "task"], sort=False)["score"].agg(["mean", "count"])
    cells = cells.reset_index()
    average = cells.groupby(["model", "setting", "tokens"], sort=False).agg(
        mean=("mean", "mean"), tasks=("task", "nunique"), count=("count", "sum")).reset_index()
    lengths = sorted(cells["tokens"].unique())
    rows = []
    for (model, setting), part in cells.groupby(["model", "setting"], sort=False):
        for task in [t for t in TASKS if t in set(part["task"])]:
            got = {r["tokens"]: f"{r['mean']:.0f} ({r['count']})" for _, r in part[part["task"] == task].iterrows()}
            rows.append({"model": model, "setting": setting, "task": task, **{f"{n} tokens": got.get(n, "-")
                                                                              for n in lengths}})
        mean = average[(average["model"] == model) & (average["setting"] == setting)]
        got = {r["tokens"]: f"**{r['mean']:.0f}** ({r['tasks']} tasks)" for _, r in mean.iterrows()}
        rows.append({"model": model, "setting": setting, "task": "average",
                     **{f"{n} tokens": got.get(n, "-") for n in lengths}})
    lines = average.assign(setting=average["model"] + ": " + average["setting"])
    return ["## RULER-style suite on real models (`python -m experiments.ruler`)\n", environment_line(samples),
            "Tasks and templates of RULER (arXiv 2404.06654; knn_longllama/ruler.py), Austen prose as the essay "
            "haystack; a length is prompt + tokens to generate. *in context*: transformers' own LlamaForCausalLM on "
            "the whole prompt (no windows, no memory); *memory ...*: the model read through its memory windows.\n",
            markdown(pd.DataFrame(rows), "Score (string_match_all, %) per task and length: mean over samples "
                     "(number of samples); average: mean over the tasks measured"),
            plot("ruler", [dict(title="RULER-style average score", x="context tokens (prompt + generation)",
                                y="average score (%)", logx=2, series=series(lines, ["setting"], "tokens", "mean"))])]


def training_free_section() -> list[str]:
    """Passkey trials of pretrained checkpoints read training-free (`python -m experiments.training_free`): per
    (model, settings, memory, length) correct / trials with the Wilson interval and the median seconds per trial."""
    trials = frame("training_free", points=["model", "settings", "memory_spec", "tokens", "seed", "trial"])
    if trials.empty:
        return []
    rows = []
    for (model, settings, memory, tokens), part in trials.groupby(["model", "settings", "memory_spec", "tokens"],
                                                                  sort=False):
        correct, count = int(part["correct"].sum()), len(part)
        rows.append({"model": model, "settings": settings, "memory": memory, "tokens": tokens,
                     "correct / trials": f"{correct}/{count} ({interval(correct, count)})",
                     "median s / trial": f"{part['seconds'].median():.0f}"})
    rows = pd.DataFrame(rows).sort_values(["model", "tokens", "settings", "memory"], kind="stable")
    return ["## Pretrained checkpoints read training-free (`python -m experiments.training_free`)\n",
            environment_line(trials),
            "Passkey prompts of the demo's format; *settings*: config overrides on top of the model's defaults "
            "(`--model smollm2`: memory in all 30 layers, windows of 512, 256 tokens kept local; "
            "docs/semantics.md#training-free); *memory*: the memory spec (`block=b`: block retrieval).\n",
            markdown(rows, "Passkey retrieval: correct / trials (95% Wilson interval), median seconds per trial")]


def block_retrieval_section() -> list[str]:
    """`python -m experiments.block_retrieval`: per passkey trial, whether the key's block was retrieved."""
    trials = frame("block_retrieval", points=["model", "settings", "memory_spec", "tokens", "seed", "trial"])
    if trials.empty:
        return []
    columns = ["model", "settings", "memory_spec", "tokens", "trial", "correct", "key_token", "memory_tokens",
               "final_hits", "decode_hits", "missed_layers"]
    return ["### Was the pass key's block retrieved? (`python -m experiments.block_retrieval`)\n",
            environment_line(trials),
            markdown(trials[columns], "Per passkey trial: *final_hits*, the share of (layer, KV head) lookups of the "
                     "prompt's final window that offered the whole key sentence; *decode_hits*, the same over the "
                     "generation steps; *missed_layers*, the layers whose final-window lookup missed it for some "
                     "head; *key_token*: its place among the memory's searched tokens")]


def environment_line(table: pd.DataFrame) -> str:
    known = common.environments().set_index("env")
    lines = [f"{e['cpus']} CPUs ({e['processor'] or 'processor not recorded'}), torch {e['torch']}, faiss "
             f"{e['faiss']}, {e['threads']} threads" for env in dict.fromkeys(table["env"]) if env in known.index
             for e in [known.loc[env]]]
    return "Environment: " + ("; ".join(dict.fromkeys(lines)) or "not recorded") + ".\n"


def crossover(rows: pd.DataFrame, method: str) -> tuple[str, str]:
    """First measured size where `method` beats dense (log-interpolated) and its speedup at its largest size."""
    times = rows.pivot_table(index="keys", columns="method", values="window_ms")
    speed = (times["dense"] / times[method]).dropna() if method in times else pd.Series(dtype=float)
    if speed.empty:
        return "-", "-"
    sizes = list(speed.index)
    top = f"{speed.iloc[-1]:.1f}x at {sizes[-1]:,}"
    slower = [i for i, n in enumerate(sizes) if speed[n] <= 1]
    if not slower:
        return f"<= {sizes[0]:,} (faster at every size)", top
    if slower[-1] == len(sizes) - 1:
        return "not reached", top
    lo, hi = sizes[slower[-1]], sizes[slower[-1] + 1]
    t = np.log(speed[lo]) / (np.log(speed[lo]) - np.log(speed[hi]))  # where log(speed) crosses 0
    return f"~{np.exp(np.log(lo) + t * (np.log(hi) - np.log(lo))):,.0f} (between {lo:,} and {hi:,})", top


def benchmarks_section() -> list[str]:
    parts = []
    plain = frame("bench_forward_plain", points=["method"])
    if not plain.empty:
        base = plain.iloc[0]
        plain = plain.assign(prefill_vs_first=plain["prefill_tok_s"] / base["prefill_tok_s"],
                             decode_vs_first=plain["decode_tok_s"] / base["decode_tok_s"])
        columns = ["method", "prefill_tok_s", "decode_tok_s", "prefill_vs_first", "decode_vs_first"]
        parts += ["### Forward pass (`python -m experiments.bench_forward`)\n", environment_line(plain),
                  markdown(plain[columns], f"Plain path (one window, no memory): tokens/s, and ratios to "
                                           f"{base['method']}")]
    ingest = frame("bench_forward_ingest", points=["method", "tokens"])
    if not ingest.empty:
        first = ingest.groupby("tokens")["seconds"].transform("first")
        ingest = ingest.assign(tokens_per_s=ingest["tokens"] / ingest["seconds"],
                               official_over_sdpa=first / ingest["seconds"])
        parts += [markdown(ingest[["method", "tokens", "seconds", "tokens_per_s", "official_over_sdpa", "peak_rss_mb",
                                   "memory_mb"]], "Dense-memory ingestion, official matmul vs fused SDPA "
                           "(official_over_sdpa: the first method's time over each one's)"),
                  plot("bench_forward_ingest", [
                      dict(title="Dense memory: ingestion time", x="context tokens", y="seconds", logx=2, logy=True,
                           series=series(ingest, ["method"], "tokens", "seconds")),
                      dict(title="Dense memory: peak RAM", x="context tokens", y="peak RSS (MB)",
                           series=series(ingest, ["method"], "tokens", "peak_rss_mb"))])]
    overhead, scaling = frame("bench_memory_overhead"), frame("bench_memory_scaling")
    if not scaling.empty:  # the run with the largest grid (the last of equals)
        counts = scaling.groupby("run", sort=False).size()
        run = counts[counts == counts.max()].index[-1]
        scaling, overhead = scaling[scaling["run"] == run], overhead[overhead["run"] == run]
        parts += ["### The kNN store (`python -m experiments.bench_memory`)\n", environment_line(scaling)]
        if not overhead.empty:
            overhead = overhead.assign(ratio=(overhead["ours_ms"] / overhead["raw_ms"]).round(3))
            columns = ["memory_spec", "keys", "dim", "queries", "dtype", "data", "build_s", "repeats", "raw_ms",
                       "ours_ms", "ratio", "recall"]
            parts.append(markdown(overhead[columns], "Library overhead: store.search vs raw index.search (ratio: ours "
                                  f"/ raw, target <= 1.25x; worst {overhead['ratio'].max():.2f}x)"))
        panels = []
        for d, part in scaling.groupby("dim"):
            cell = part.assign(ms=[f"{ms:.1f}" + (f" (r={r})" if pd.notna(r) else "")
                                   for ms, r in zip(part["window_ms"], part["recall"])])
            held = part.assign(mib=[f"{h} / {p}" for h, p in zip(part["held_mib"], part["window_peak_mib"])])
            methods = list(dict.fromkeys(part["method"]))
            speed = pd.DataFrame([(m, *crossover(part, m)) for m in methods if m != "dense"],
                                 columns=["method", "kNN faster than dense from keys =", "speedup at largest size"])
            def by_size(t, values):
                return t.pivot(index="keys", columns="method", values=values)[methods].reset_index()

            parts += [markdown(by_size(cell, "ms"), f"d = {d}: memory-layer time per window in ms (one head, "
                               f"{part['queries'].iloc[0]} queries, k = {part['k'].iloc[0]}; r = recall@k)"),
                      markdown(by_size(held, "mib"), f"d = {d}: memory held / window peak RSS (MiB)"),
                      markdown(speed, f"d = {d}: crossover")]
            panels += [dict(title=f"d = {d}", x="memory size (keys)", y=y, logx=10, logy=True,
                            series=series(part, ["method"], "keys", column))
                       for y, column in (("time per window (ms)", "window_ms"), ("memory held (MiB)", "held_mib"))]
        parts.append(plot("bench_memory_scaling", panels))
    scan = frame("bench_ivf_scan", points=["keys", "queries", "nprobe", "method"])
    if not scan.empty:
        scan = scan.assign(vs_search=(scan["ms"] / scan.groupby(["keys", "queries", "nprobe"])["ms"].transform("first"))
                           .round(3))
        batched = scan[scan["method"] == "big_batch"].assign(setting=lambda t: [
            f"{q} queries, nprobe {p}" for q, p in zip(t["queries"], t["nprobe"])])
        parts += ["### IVF scan (`python -m experiments.bench_ivf_scan`)\n", environment_line(scan),
                  markdown(scan[["keys", "dim", "queries", "k", "nprobe", "method", "ms", "vs_search", "same_ids",
                                 "repeats"]], "IVF,Flat search (l2-augmented keys): plain "
                           "`index.search` against `faiss.contrib.big_batch_search` (vs_search: time over the plain "
                           "search's; same_ids: share of the plain search's ids found)"),
                  plot("bench_ivf_scan", [dict(title="Query-batched IVF scan vs plain search (below 1: faster)",
                                               x="keys in the index", y="big_batch time / index.search time", logx=10,
                                               logy=True, hline=1.0,
                                               series=series(batched, ["setting"], "keys", "vs_search"))])]
    read = frame("bench_read")
    if not read.empty:
        for column, default in (("model", "demo"), ("attention", "eager"), ("settings", "")):  # earlier runs
            read[column] = read[column].replace("", default) if column in read else default
        read = read.drop_duplicates(["model", "attention", "tokens", "memory_spec", "settings"], keep="last")
        columns = [c for c in ("run", "model", "attention", "tokens", "memory_spec", "settings", "seconds", "x_floor",
                               "cpu_seconds", "x_floor_cpu", "tokens_per_s", "peak_rss_mb", "memory_mb")
                   if c in read.columns]
        knn = read[read["memory_spec"] != "bare windows"]
        knn = knn.assign(ratio=knn["x_floor_cpu"].fillna(knn["x_floor"]) if "x_floor_cpu" in knn else knn["x_floor"])
        parts += ["### Reading cost over the bare model (`python -m experiments.bench_read`)\n", environment_line(read),
                  markdown(read[columns], "A model reading N filler tokens with `Document.read`, one thread: "
                           "seconds, and x_floor, the time over the same windows through the model without memory "
                           "layers in the same process (same attention implementation); cpu_seconds and x_floor_cpu: "
                           "the same in CPU time of the process, steadier when other jobs share the cores (empty in "
                           "earlier runs)"),
                  plot("bench_read", [dict(title="Reading with kNN memory, as a multiple of the bare windows",
                                           x="tokens read", y="CPU time / bare windows' (wall time in early runs)",
                                           logx=2, logy=True,
                                           series=series(knn, ["model", "attention", "memory_spec", "settings"], "tokens",
                                                         "ratio"))])]
    checks = frame("device_check", points=["check", "device"])
    if not checks.empty:
        columns = [c for c in ("check", "device", "memory_spec", "keys", "queries", "heads", "dim", "k", "same_ids",
                               "max_score_diff", "recall_cpu", "recall_device", "faiss_gpu") if c in checks.columns]
        parts += ["### Device check (`experiments/device_check.sh`)\n", environment_line(checks),
                  markdown(checks[columns], "The device's exact top-k against the CPU's (same_ids: share of queries "
                           "with the same id set) and IVF recall@k on the CPU and on the device (faiss_gpu: the "
                           "indexes ran on the GPU)")]
    parts += parallel_section() + disk_section()
    return ["## Benchmarks\n", *parts] if parts else []


def parallel_section() -> list[str]:
    """bench_parallel: a row per (tokens, memory, layout), per-rank values side by side ("rank 0 / rank 1")."""
    table = frame("bench_parallel", points=["tokens", "memory_spec", "layout", "rank"])
    if table.empty:
        return []
    ranks, summary = table[table["rank"] != "all"], table[table["rank"] == "all"].copy()
    keys = ["tokens", "memory_spec", "layout"]

    def per_rank(column: str, digits: int = 1) -> list[str]:
        grouped = ranks.groupby(keys, sort=False)[column].agg(lambda v: " / ".join(
            "-" if pd.isna(x) else f"{x:.{digits}f}" for x in v))
        return [grouped.get(tuple(row[k] for k in keys), "-") for _, row in summary.iterrows()]

    rss = ranks.groupby(keys, sort=False)["peak_rss_mb"].max()
    summary["peak_rss_mb"] = [rss.get(tuple(row[k] for k in keys)) for _, row in summary.iterrows()]
    per_rank_columns = (("cpu_s", 0), ("keys", 0), ("search_s", 1), ("collective_s", 1), ("merge_s", 1), ("sent_mb", 0))
    for column, digits in per_rank_columns:
        if column in ranks:
            summary[column] = per_rank(column, digits)
    if "recall" not in summary:
        summary["recall"] = np.nan
    columns = [c for c in ["tokens", "memory_spec", "layout", "ranks", "seconds", "x_one_process", "cpu_s",
                           "peak_rss_mb", "keys", "search_s", "collective_s", "merge_s", "sent_mb", "recall"]
               if c in summary]
    sharded = summary[summary["layout"] != "one process"]
    return ["### Context parallelism (`python -m experiments.bench_parallel`)\n", environment_line(table),
            markdown(summary[columns], "The demo reading N tokens with its memory sharded over gloo processes (one "
                     "thread each) against one process, in the same run: seconds of the slowest rank and their ratio "
                     "to one process; peak RSS of the largest process; per rank (r0 / r1): CPU seconds of the read, "
                     "keys held, seconds searching its shard, inside collectives (waiting for the other rank included) "
                     "and merging, MB handed to collectives; recall@k of the first memory layer's lookups for one "
                     "more window against the exact top-k (ties counted)"),
            plot("bench_parallel", [
                dict(title="Reading time over one process's", x="tokens read", y="time / one process", logx=2,
                     hline=1.0, series=series(sharded, ["memory_spec", "layout"], "tokens", "x_one_process")),
                dict(title="Peak RSS of the largest process", x="tokens read", y="peak RSS (MB)", logx=2,
                     series=series(summary, ["memory_spec", "layout"], "tokens", "peak_rss_mb"))])]


def disk_section() -> list[str]:
    """`storage=disk` against RAM: the 3B-shaped store and the demo model reading (experiments/bench_disk.py)."""
    parts = []
    store = frame("disk_store", points=["mode", "tokens", "memory_spec", "threads"])
    if not store.empty:
        columns = [c for c in ("mode", "tokens", "memory_spec", "threads", "queries", "add_tokens_per_s",
                               "build_peak_rss_mb", "search_ms", "search_peak_rss_mb", "disk_gb", "recall",
                               "same_ids", "same_results") if c in store.columns]
        parts += ["### Memory on disk (`python -m experiments.bench_disk`)\n", environment_line(store),
                  markdown(store[columns], "A LongLLaMA-3B-shaped memory (3 layers x 32 heads x head dim 100, bf16) "
                           "built from synthetic keys through `KnnStore`: add throughput, peak RSS of the build and of "
                           "one layer's search (`queries` per head), files on disk, recall@32 against the exact top-32 "
                           "and, for disk, the share of ids (same_results: ids, scores and values) equal to the RAM "
                           "store's"),
                  plot("disk_store", [dict(title="3B-shaped memory: peak RSS of the build", x="tokens",
                                           y="peak RSS (MB)", logx=2,
                                           series=series(store, ["mode", "memory_spec"], "tokens",
                                                         "build_peak_rss_mb"))])]
    read = frame("disk_read", points=["mode", "tokens", "memory_spec"])
    if not read.empty:
        ram = read[read["mode"] == "ram"].set_index(["run", "tokens", "memory_spec"])["seconds"]
        read = read.assign(time_vs_ram=[round(s / ram.get((r, t, m), float("nan")), 2) for r, t, m, s in
                                        zip(read["run"], read["tokens"], read["memory_spec"], read["seconds"])])
        columns = [c for c in ("mode", "tokens", "memory_spec", "attention", "seconds", "time_vs_ram", "peak_rss_mb",
                               "memory_mb", "disk_mb", "passkey_tokens", "passkey_correct", "passkey_trials", "passkey_generated")
                   if c in read.columns]
        parts += [markdown(read[columns], "The demo model reading N filler tokens with `Document.read`, keys and "
                           "values in RAM or on disk (same index settings): seconds, time over RAM mode in the same "
                           "run, peak RSS, then passkey trials in both modes (the generated ids per trial)"),
                  plot("disk_read", [dict(title="Demo model reading: peak RSS", x="tokens read", y="peak RSS (MB)",
                                          logx=2, series=series(read, ["mode", "memory_spec"], "tokens",
                                                                "peak_rss_mb"))])]
    growth = frame("disk_growth", points=["mode", "tokens"])
    if not growth.empty:
        parts.append(markdown(growth[["mode", "tokens", "stored_mb", "allocated_mb", "peak_over_start_mb"]],
                              "RAM storage of one 3B-shaped layer (exact), filled window by window: capacity grown "
                              "by doubling vs reserved exactly first (`KnnStore.reserve`, as `Document.read` of "
                              "token ids does); peak RSS over the start"))
    return parts


def archives() -> str:
    """Links to archived result sets (results/archive/<name>/README.md, first line as the title)."""
    lines = [f"- [`results/archive/{path.parent.name}/`](results/archive/{path.parent.name}/README.md): "
             f"{path.read_text().splitlines()[0].lstrip('# ')}"
             for path in sorted((common.RESULTS / "archive").glob("*/README.md"))]
    return "## Archived results\n\n" + "\n".join(lines) + "\n" if lines else ""


# -- the pages -------------------------------------------------------------------------------------------------------
def headline() -> str:
    """The short results table of the top-level README: passkey retrieval per length of the first scale with passkey
    results, pooled over its runs, dense beside exact Flat k=32 and the kNN settings measured at most lengths, each
    cell with its Wilson interval; then the scale's goals, one line each; then a link to experiments/README.md."""
    link = "Every table, plot and command: [experiments/README.md](experiments/README.md)."
    scale = next((s for s in SCALES if not passkey_points(s).empty), None)
    if scale is None:
        return "No results yet: run `python -m experiments.run_experiments`.\n"
    table = pooled(passkey_points(scale))
    counts = {(r["index"], r["k"], r["tokens"]): (r["correct"], r["trials"]) for _, r in table.iterrows()}
    lengths = table[~table["index"].isin(DENSE)].groupby(["index", "k"], sort=False)["tokens"].nunique()
    exact = [s for s in lengths.index if s == ("Flat", "32")]
    others = sorted((s for s in lengths.index if s not in exact and lengths[s] > 1),
                    key=lambda s: (-lengths[s], s[0], k_number(s[1])))
    columns = (exact + others)[:HEADLINE_KNN_COLUMNS] or list(lengths.sort_values(ascending=False).index[:1])
    rows = sorted({n for i, k, n in counts if (i, k) in columns or i in DENSE})[-HEADLINE_LENGTHS:]

    def cell(c, note=""):
        return "-" if c is None else f"{c[0]}/{c[1]} ({interval(*c)}){note}"

    lines = [f"Passkey retrieval of the demo model (`--scale {scale}` runs, pooled over seeds): correct / trials "
             "(95% Wilson interval); \"-\": not run at that length.", "",
             "| tokens | dense | " + " | ".join(f"{i} k={k}" for i, k in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for n in rows:
        dense = cell(counts[("dense", "-", n)]) if ("dense", "-", n) in counts else (
            cell(counts[("dense sdpa", "-", n)], " sdpa") if ("dense sdpa", "-", n) in counts else "-")
        lines.append(f"| {n} | {dense} | " + " | ".join(cell(counts.get((i, k, n))) for i, k in columns) + " |")
    shown = legend(scale, [i for i, _ in columns] + (["dense sdpa"] if "sdpa |" in "\n".join(lines) else []))
    lines += ["", f"Labels: {shown}." if shown else "", "",
              f"Goals of the `--scale {scale}` runs (kNN against dense: on the same prompts only):", ""]
    lines += [f"- {goal}: {measured} (met: {verdict(met)})" for goal, measured, met in goal_rows(scale)]
    if "(the shipped one)" not in model_line(scale):
        lines += ["", "**Some of these runs used another demo checkpoint than the shipped one** (see the results "
                  "page)."]
    return "\n".join(lines + real_model_lines() + ["", link]) + "\n"


HEADLINE_TRIALS = 8  # passkey trials of a pretrained checkpoint's setting, all lengths together, for the README


def real_model_lines() -> list[str]:
    """Headline lines for pretrained checkpoints: passkey trials read training-free, per (model, settings, memory,
    length), the RULER-style average per (model, setting, length), and the reading cost over the floor."""
    lines = []
    trials = frame("training_free", points=["model", "settings", "memory_spec", "tokens", "seed", "trial"])
    if not trials.empty:  # probes of fewer trials are on the results page only
        lines += ["", "Pretrained checkpoints read training-free (`python -m experiments.training_free`), passkey "
                  f"correct / trials per length, settings of {HEADLINE_TRIALS}+ trials:", ""]
        for (model, settings, memory), setting in trials.groupby(["model", "settings", "memory_spec"], sort=False):
            points = [f"{tokens}: {int(part['correct'].sum())}/{len(part)}" for tokens, part in
                      setting.groupby("tokens") if len(part) > 1]
            if points and len(setting) >= HEADLINE_TRIALS:
                lines.append(f"- {model}, {settings}, {memory}: {', '.join(points)}")
    samples = frame("ruler_sample", points=["model", "setting", "task", "tokens", "seed", "sample"])
    if not samples.empty:
        cells = samples.groupby(["model", "setting", "tokens", "task"], sort=False)["score"].mean().reset_index()
        average = cells.groupby(["model", "setting", "tokens"], sort=False).agg(
            score=("score", "mean"), tasks=("task", "nunique")).reset_index()
        lines += ["", "RULER-style average score (%, tasks measured) per length:", ""]
        for (model, setting), part in average.groupby(["model", "setting"], sort=False):
            part = part.sort_values("tokens", key=lambda tokens: tokens.astype(float))
            points = ", ".join(f"{r['tokens']}: {100 * r['score']:.0f} ({r['tasks']})" for _, r in part.iterrows())
            lines.append(f"- {model}, {setting}: {points}")
    read = frame("bench_read")
    if not read.empty and "model" in read:
        read = read[~read["model"].isin(["", "demo"]) & (read["attention"] == "sdpa")]
        read = read.assign(settings=read["settings"] if "settings" in read else "")
        read = read[read["memory_spec"] != "bare windows"].drop_duplicates(
            ["model", "attention", "tokens", "memory_spec", "settings"], keep="last")
        if not read.empty:
            lines += ["", "Reading cost of pretrained checkpoints (`python -m experiments.bench_read --model ...`), CPU "
                      "time over the same windows without memory, SDPA, one thread:", ""]
            for (model, memory, settings), part in read.groupby(["model", "memory_spec", "settings"], sort=False):
                points = ", ".join(f"{r['tokens']}: {r['x_floor_cpu']:.2f}x" for _, r in part.sort_values("tokens")
                                   .iterrows())
                lines.append(f"- {model}, {memory}{f' ({settings})' if settings else ''}: {points}")
    return lines


PAGE_HEADER = """# Experiment results

<!-- Generated by `python experiments/update_readme.py` from experiments/results/; do not edit by hand. -->

This file is generated by `python experiments/update_readme.py` from [`results/results.csv`](results/results.csv),
one long table with a line per measured value (experiment, run, environment id, settings, metric, value; the
environments are described in [`results/environments.csv`](results/environments.csv)), never typed by hand; the same
script writes the headline table of the top-level [README](../README.md). Advice on choosing an index and its
settings, with these measurements: [docs/tuning.md](../docs/tuning.md).

## How these results are made

Every command appends its rows to `results/results.csv`; each table below is a group-by over it (a point measured
again counts once, its last run; passkey points of different seeds pool their trials). From the repository root:

```bash
python -m experiments.run_experiments --scale small --threads 2   # under 10 min on 2 CPU cores
python -m experiments.run_experiments --scale full --threads 2    # 4k .. 1M tokens (many hours on 2 CPU cores)
python -m experiments.run_experiments --scale gpu --device cuda   # GPU variant: a few minutes on one GPU
python -m experiments.run_experiments --scale small --only passkey recall   # a subset
python -m experiments.run_experiments --scale full --only passkey --indices 'IVF1024,Flat l2' --lengths 1048576 \\
    --trials 1 --seed 1 --depths --run 1m_s3_seed1 --threads 1   # one more 1M trial beside others; goals pool seeds
python -m experiments.run_experiments --scale full --only passkey --indices dense Flat --ks 32 --lengths 65536 \\
    --trials 5 --seed 2 --depths --run 64k_seed2 --threads 1   # dense beside exact top-32 on the same prompts
python -m experiments.run_experiments --scale full --only passkey --indices 'dense sdpa' --lengths 262144 \\
    --dense-max 262144 --trials 5 --seed 0 --depths --run 262k_dense_seed0 --threads 1   # dense via fused SDPA
python -m experiments.run_experiments --scale full --only ingest --indices dense 'dense sdpa' \\
    --lengths 4096 16384 65536   # re-time dense memory, official matmul beside fused SDPA
python -m experiments.passkey_failures --lengths 4096 --trials 100   # passkey failures against window boundaries
python -m experiments.passkey_failures --key-line first --lengths 2048 4096   # the key stated once
python -m experiments.passkey_failures --recorded full   # where the key line sat in the recorded full-scale trials
python -m experiments.bench_forward     # plain path vs transformers' LlamaForCausalLM; dense ingestion, matmul vs SDPA
python -m experiments.bench_memory      # the kNN store: library overhead, memory-layer time vs memory size
python -m experiments.bench_ivf_scan    # plain IVF search vs faiss.contrib.big_batch_search
python -m experiments.bench_read        # reading with kNN memory as a multiple of the bare model
python -m experiments.bench_parallel    # the memory sharded over 2 processes against one process
python -m experiments.ruler --model smollm2 --in-context --lengths 2048 4096 8192 --samples 10   # RULER baseline
python -m experiments.ruler --model smollm2 --memory "exact k=32" --lengths 8192 --samples 3     # a memory mode
python -m experiments.training_free --lengths 32768 --trials 2 --settings "mem_distance=1024,mem_sink_tokens=64" \\
    --memory "exact k=16 block=128"   # a pretrained checkpoint (SmolLM2) read training-free, per setting
python -m experiments.train_demo_model  # the demo checkpoint (its MODEL_CARD.md gives every stage's command)
python experiments/update_readme.py    # regenerate this file, its plots and the README's headline table
```

A run's rows carry its label (`--run`, default its start time) and environment id; the run column of the earlier
full-scale passkey runs (e.g. `full_1m_s3_seed12`) names the archived files that hold their exact command lines.

The passkey sweeps run one dense variant: the official matmul, or fused SDPA (the same math, faster to read) when only
`dense sdpa` is named; the kNN-vs-dense goal compares each kNN point with whichever ran on the same prompts. The `gpu`
scale runs the model and an exact top-k (`torch`) on the GPU and Faiss IVF on the GPU when `faiss-gpu` is installed
(on the CPU otherwise). The per-run files of earlier versions (CSV, markdown, plots, environment JSON, printed logs)
were converted once into the table and are kept under `results/archive/per_run_files/`.
"""


def results_page() -> str:
    """The whole of experiments/README.md."""
    measured = [s for s in SCALES if any(not frame(e, s).empty for e in ("passkey", "ingest", "decode", "recall"))]
    parts = [part for scale in measured for part in scale_section(scale)]
    parts += failures_section() + ruler_section() + training_free_section() + block_retrieval_section() + \
        [archives()] + benchmarks_section()
    return PAGE_HEADER + "\n" + "\n".join(part for part in parts if part)


def main(readme_path: str | None = None, page_path: str | None = None) -> None:
    readme_path = Path(readme_path or ROOT / "README.md")
    page_path = Path(page_path or ROOT / "experiments" / "README.md")
    readme = readme_path.read_text()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{readme_path} has no {BEGIN} ... {END} markers")
    page_path.write_text(results_page())
    readme_path.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{headline()}{END}",
                                  readme, flags=re.S))
    print(f"{page_path} regenerated; README headline table regenerated")


if __name__ == "__main__":
    main()
