"""PNG plots from a device's results CSV: time and peak memory vs C, one line per provider.

python -m bench.plot bench/results/<device>.csv margin_ce
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path


def plot_op(csv_path: str | Path, op: str) -> list[Path]:
    """One PNG per (op, variant, mode, B, dtype); the newest row wins for repeated measurements."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    latest: dict = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row["op"] == op:
                name = "_".join(filter(None, (row["op"], row.get("variant", ""))))
                latest[(name, row["mode"], row["B"], row["dtype"], row["provider"], int(row["C"]))] = row
    groups = defaultdict(lambda: defaultdict(list))
    for (o, mode, b, dt, prov, c), row in sorted(latest.items(), key=lambda kv: kv[0][-1]):
        groups[(o, mode, b, dt)][prov].append((c, row))
    written = []
    for (o, mode, b, dt), provs in groups.items():
        if max(len(v) for v in provs.values()) < 2:
            continue  # a single C: a table, not a plot
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for prov, pts in sorted(provs.items()):
            cs = [c for c, _ in pts]
            ax_t.plot(cs, [float(r["ms_median"]) for _, r in pts], marker="o", label=prov)
            mem = [(c, float(r["peak_mem_bytes"]) / 2**20) for c, r in pts if r["peak_mem_bytes"] not in ("", None)]
            if mem:
                ax_m.plot(*zip(*mem, strict=True), marker="o", label=prov)
        device = next(iter(provs.values()))[0][1]["device"]
        for ax, label in ((ax_t, "ms (median)"), (ax_m, "peak extra memory (MiB)")):
            ax.set(xscale="log", yscale="log", xlabel="classes C", ylabel=label)
            ax.grid(alpha=0.3)
        ax_t.legend(fontsize=7)
        fig.suptitle(f"{o} {mode}, B={b}, {dt}, {device}")
        fig.tight_layout()
        out = csv_path.with_name(f"{csv_path.stem}_{o}_{mode.replace('+', '_')}_B{b}_{dt}.png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written


if __name__ == "__main__":
    for p in plot_op(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "margin_ce"):
        print(p)
