"""PNG plots from a device's results CSV.

python -m bench.plot bench/results/<device>.csv margin_ce         # time and memory vs C, a line per provider
python -m bench.plot bench/results/<device>.csv margin_ce --bars  # one shape: a bar per provider

The README shows the bar charts of the CPU results (bench/results/*_bars.png); a GPU session adds the curves.
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


def plot_bars(csv_path: str | Path, op: str, variants=("", "frozen"), mode: str = "fwd+bwd") -> Path | None:
    """Time and extra peak memory per provider at the largest measured C, one panel pair per variant (the newest
    row of each provider wins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    rows: dict = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row["op"] == op and row["mode"] == mode and row.get("variant", "") in variants:
                rows.setdefault(row.get("variant", ""), []).append(row)
    variants = [v for v in variants if v in rows]
    if not variants:
        return None
    fig, axes = plt.subplots(len(variants), 2, figsize=(11, 3.2 * len(variants)), squeeze=False)
    for (ax_t, ax_m), v in zip(axes, variants, strict=True):
        big = max(int(r["C"]) for r in rows[v])
        latest = {r["provider"]: r for r in rows[v] if int(r["C"]) == big}
        order = sorted(latest, key=lambda p: float(latest[p]["ms_median"]))
        ms = [float(latest[p]["ms_median"]) for p in order]
        mem = [float(latest[p]["peak_mem_bytes"] or 0) / 2**20 for p in order]
        colors = [{"mdk": "tab:orange", "gem": "tab:gray"}.get(p[:3], "tab:blue") for p in order]
        ax_t.barh(order, ms, color=colors)
        ax_m.barh(order, mem, color=colors)
        r0 = latest[order[0]]
        title = f"{op}{' (' + v + ' centers)' if v else ''}, B={r0['B']} D={r0['D']} C={big:,} {r0['dtype']}, {mode}"
        ax_t.set(xlabel="ms (median)", title=title)
        ax_m.set(xlabel="extra peak memory (MiB)", title=f"{r0['device']}, torch {r0.get('torch', '')}")
        for ax in (ax_t, ax_m):
            ax.invert_yaxis()
            ax.grid(axis="x", alpha=0.3)
            ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    out = csv_path.with_name(f"{csv_path.stem}_{op}_bars.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if "--bars" in sys.argv:
        print(plot_bars(sys.argv[1], sys.argv[2]))
    else:
        for p in plot_op(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "margin_ce"):
            print(p)
