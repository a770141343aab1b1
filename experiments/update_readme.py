"""Regenerate the README's results section from experiments/results/*.md (never typed by hand).

    python experiments/update_readme.py            # uses the `small` results, and `full` ones where present

Replaces everything between the markers `<!-- results:begin -->` and `<!-- results:end -->`.
"""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ORDER = ["passkey", "passkey_depth", "ingest", "decode", "recall"]
BENCHES = ["bench_forward_plain", "bench_forward_ingest", "bench_memory_overhead", "bench_memory_scaling"]


def section() -> str:
    parts = []
    for scale in ("full", "small"):
        found = [name for name in ORDER if os.path.exists(os.path.join(RESULTS, f"{name}_{scale}.md"))]
        if not found:
            continue
        parts.append(f"### Scaling experiments (`--scale {scale}`)\n")
        for name in found:
            with open(os.path.join(RESULTS, f"{name}_{scale}.md")) as f:
                parts.append(f.read().strip() + "\n")
            if os.path.exists(os.path.join(RESULTS, f"{name}_{scale}.png")):
                parts.append(f"![{name}](experiments/results/{name}_{scale}.png)\n")
    bench = [name for name in BENCHES if os.path.exists(os.path.join(RESULTS, f"{name}.md"))]
    if bench:
        parts.append("### Benchmarks\n")
        for name in bench:
            with open(os.path.join(RESULTS, f"{name}.md")) as f:
                parts.append(f"`{name}`\n\n" + f.read().strip() + "\n")
            if os.path.exists(os.path.join(RESULTS, f"{name}.png")):
                parts.append(f"![{name}](experiments/results/{name}.png)\n")
    return "\n".join(parts) if parts else "No results yet: run `python experiments/run_experiments.py`.\n"


def main() -> None:
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        readme = f.read()
    if BEGIN not in readme:
        raise SystemExit(f"README.md has no {BEGIN} marker")
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{section()}\n{END}", readme, flags=re.S)
    with open(path, "w") as f:
        f.write(new)
    print("README results section regenerated")


if __name__ == "__main__":
    main()
