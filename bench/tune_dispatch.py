"""Turn a GPU benchmark run into the table behind ``backend="auto"`` (see mdkernels/backends.py).

    python -m bench.bench_margin_ce --suite gpu --modes fwd+bwd      # times mdk_triton and mdk_cuda
    python -m bench.bench_distill --device cuda --ops angular_distill
    python -m bench.tune_dispatch                                     # this GPU's CSV -> dispatch_table.py

For every (op, dtype, B, C, D) where both backends were timed in fwd+bwd, the latest pair of medians
becomes a row of mdkernels/dispatch_table.py (rows of other GPUs are kept). The markdown table it
prints goes into the README.
"""

from __future__ import annotations

import argparse
import csv
import math
import pprint
from pathlib import Path

from mdkernels import dispatch_table
from mdkernels.ops import OPS

# the ops with both GPU backends, and the variants measured on the same shapes as auto's calls (frozen
# centers would collide with the trainable rows of the same shape)
TABLE_OPS = [name for name, op in OPS.items() if {"triton", "cuda"} <= set(op.backends)]
TABLE_VARIANTS = ("", "maps")
TABLE = Path(__file__).resolve().parents[1] / "mdkernels" / "dispatch_table.py"
HEADER = f'"""{dispatch_table.__doc__}"""\n\n'  # the table module keeps its docstring


def measured_rows(csv_path: Path) -> list[dict]:
    """The latest mdk_triton / mdk_cuda fwd+bwd medians per (device, op, dtype, B, C, D), both present."""
    latest: dict[tuple, dict] = {}
    with csv_path.open() as f:
        for r in csv.DictReader(f):
            if r["op"] not in TABLE_OPS or r.get("variant", "") not in TABLE_VARIANTS:
                continue
            if r["mode"] != "fwd+bwd" or r["provider"] not in ("mdk_triton", "mdk_cuda"):
                continue
            try:
                ms = float(r["ms_median"])
            except ValueError:
                continue
            if not math.isfinite(ms) or ms <= 0:
                continue
            key = (r["device"], r["op"], r["dtype"], int(r["B"]), max(int(r["C"]), 1), int(r["D"]))
            latest.setdefault(key, {})[r["provider"]] = ms  # later rows of the file win
    rows = []
    for (device, op, dtype, B, C, D), ms in sorted(latest.items()):
        if "mdk_triton" in ms and "mdk_cuda" in ms:
            rows.append(dict(op=op, device=device, dtype=dtype, B=B, C=C, D=D, ms_triton=round(ms["mdk_triton"], 4),
                             ms_cuda=round(ms["mdk_cuda"], 4)))  # fmt: skip
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    path.write_text(HEADER + "ROWS: list[dict] = " + pprint.pformat(rows, width=118, sort_dicts=False) + "\n")


def markdown(rows: list[dict]) -> str:
    lines = ["| GPU | op | dtype | B | C | D | triton ms | cuda ms | auto |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        winner = "cuda" if r["ms_cuda"] < r["ms_triton"] else "triton"
        lines.append(f"| {r['device']} | {r['op']} | {r['dtype']} | {r['B']} | {r['C']} | {r['D']} | "
                     f"{r['ms_triton']:.3f} | {r['ms_cuda']:.3f} | {winner} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    from bench import harness

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", type=Path, help="benchmark CSV (default: bench/results/<this GPU>.csv)")
    p.add_argument("--out", type=Path, default=TABLE, help="the table module to (re)write")
    args = p.parse_args(argv)
    csv_path = args.csv or harness.RESULTS / f"{harness.slug(harness.device_name('cuda'))}.csv"
    new = measured_rows(csv_path)
    if not new:
        raise SystemExit(f"{csv_path}: no shape with both mdk_triton and mdk_cuda timed in fwd+bwd")
    devices = {r["device"] for r in new}
    old = {}
    if args.out.exists():
        exec(compile(args.out.read_text(), str(args.out), "exec"), old)  # our own generated file
    keep = [r for r in old.get("ROWS", []) if r["device"] not in devices]
    write_table(keep + new, args.out)
    print(markdown(keep + new))
    print(f"wrote {len(new)} rows for {sorted(devices)} to {args.out}")


if __name__ == "__main__":
    main()
