"""IJB-C 1:1 and 1:N: insightface's own evaluation code beside ``mdk eval``, on one generated folder and one model.

    python scripts/check_against_insightface.py --insightface /path/to/your/insightface [--out FILE]

It needs your copy of insightface's repository (nothing of it is in this one) and, for insightface's scripts,
pandas, scikit-learn, scikit-image, OpenCV and matplotlib. It

1. writes an IJB-C folder in insightface's layout (:func:`mdkernels.eval.synth_ijb.make_ijb_folder`, seeded),
2. builds insightface's ``r18`` from that repository's ``recognition/arcface_torch/backbones`` with its own
   initialisation, seeded (random weights: the numbers only have to agree) and saves its state dict as ``model.pt``,
3. runs ``recognition/arcface_torch/eval_ijbc.py`` as a script, unchanged, on the CPU: the only shims are
   ``.cuda()`` as a no-op, ``np.int`` restored for numpy 2 (removed in 1.24; the script still calls it) and a stand-in
   for menpo's colour helper (a plotting import). It prints its TAR table and saves the pair scores,
4. runs the 1:N functions of ``recognition/_evaluation_/ijb/ijb_1n.py`` (its ``__main__`` steps, in order) on the
   image features eval_ijbc.py computed,
5. runs ``mdk eval``'s pipeline (:func:`mdkernels.eval.ijb.evaluate_ijb`) on the same model and folder,

and prints both TAR tables, the largest pair-score difference and both 1:N results, then writes them to ``--out``
(``bench/results/insightface_check.txt`` by default) with the machine, versions and both repositories' commits.
The exit code is 0 when the TAR tables and the 1:N figures are equal and the scores agree to 1e-5.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import math
import os
import platform
import re
import runpy
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _git(path: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def _shims():
    """What insightface's scripts need on a CPU with numpy 2: ``.cuda()`` a no-op, ``np.int``, menpo's helper."""
    saved = (torch.nn.Module.cuda, torch.Tensor.cuda, getattr(np, "int", None), dict(sys.modules))
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    np.int = int  # removed from numpy in 1.24; eval_ijbc.py and ijb_1n.py call np.int
    menpo = types.ModuleType("menpo")
    visualize = types.ModuleType("menpo.visualize")
    viewmpl = types.ModuleType("menpo.visualize.viewmatplotlib")
    viewmpl.sample_colours_from_colourmap = lambda n, name: [(0.2, 0.4, 0.6)] * n
    visualize.print_progress = lambda it, *a, **k: it
    menpo.visualize, visualize.viewmatplotlib = visualize, viewmpl
    sys.modules.update({"menpo": menpo, "menpo.visualize": visualize, "menpo.visualize.viewmatplotlib": viewmpl})
    if importlib.util.find_spec("prettytable") is None:  # eval_ijbc.py prints its table with PrettyTable
        pt = types.ModuleType("prettytable")

        class PrettyTable:
            def __init__(self, head):
                self.rows = [head]

            def add_row(self, row):
                self.rows.append(row)

            def __str__(self):
                return "\n".join(" | ".join(map(str, r)) for r in self.rows)

        pt.PrettyTable = PrettyTable
        sys.modules["prettytable"] = pt
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda = saved[0], saved[1]
        if saved[2] is None:
            del np.int
        for name in set(sys.modules) - set(saved[3]):
            if name.split(".")[0] in ("menpo", "prettytable", "backbones", "embedding", "ijb_1n"):
                del sys.modules[name]


def insightface_1to1(insightface: Path, folder: Path, model_pt: Path, work: Path) -> dict:
    """eval_ijbc.py, run as its own script: its printed TAR row, its saved scores and its image features."""
    script = insightface / "recognition" / "arcface_torch" / "eval_ijbc.py"
    argv = ["eval_ijbc.py", "--model-prefix", str(model_pt), "--image-path", str(folder), "--result-dir", str(work),
            "--batch-size", "16", "--network", "r18", "--job", "insightface", "--target", "IJBC"]  # fmt: skip
    out, saved_argv, saved_path = io.StringIO(), sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = argv, [str(script.parent)]
    try:
        with _shims(), contextlib.redirect_stdout(out):
            ns = runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    text = out.getvalue()
    row = next(line for line in text.splitlines() if "ijbc-IJBC" in line)
    tars = [float(v) for v in re.findall(r"\d+\.\d\d", row)]
    return {"tar": tars, "scores": np.load(work / "insightface" / "ijbc.npy"), "img_feats": ns["img_feats"],
            "faceness": ns["faceness_scores"], "printed": row.strip()}  # fmt: skip


def insightface_1toN(insightface: Path, folder: Path, img_feats: np.ndarray, faceness: np.ndarray) -> dict:
    """ijb_1n.py's functions, in the order of its ``__main__``, on eval_ijbc.py's image features (test mode N1D1F2)."""
    path = insightface / "recognition" / "_evaluation_" / "ijb" / "ijb_1n.py"
    sys.modules["embedding"] = types.ModuleType("embedding")  # its model wrapper: not needed for these functions
    sys.modules["embedding"].Embedding = object
    with _shims():
        spec = importlib.util.spec_from_file_location("ijb_1n", path)
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        meta = folder / "meta"
        g1_t, g1_s = m.read_template_subject_id_list(str(meta / "ijbc_1N_gallery_G1.csv"))
        g2_t, g2_s = m.read_template_subject_id_list(str(meta / "ijbc_1N_gallery_G2.csv"))
        g_t, g_s = np.concatenate([g1_t, g2_t]), np.concatenate([g1_s, g2_s])
        templates, medias = m.read_template_media_list(str(meta / "ijbc_face_tid_mid.txt"))
        half = img_feats.shape[1] // 2
        feats = (img_feats[:, :half] + img_feats[:, half:]) * faceness[:, None]
        g_f, _, g_ids = m.image2template_feature(feats, templates, medias, g_t, g_s)
        p_t, p_s = m.read_template_subject_id_list(str(meta / "ijbc_1N_probe_mixed.csv"))
        p_f, _, p_ids = m.image2template_feature(feats, templates, medias, p_t, p_s)
        mask = m.gen_mask(p_ids, g_ids)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            m.evaluation(p_f, g_f, mask)
    text = out.getvalue()
    res = {f"top{k}": float(re.search(rf"top{k} = ([\d.]+)", text).group(1)) for k in (1, 5, 10)}
    from mdkernels.eval.ijb import _far_key

    for far, pr in re.findall(r"far = ([\d.]+) pr = ([\d.]+)", text):
        res[f"tpir@fpir={_far_key(float(far))}"] = float(pr)
    return res


def _cpu() -> str:
    """The CPU's model name (as bench/harness.py names the machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--insightface", required=True, help="your clone of github.com/deepinsight/insightface")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "insightface_check.txt"),
                   help="where the report goes")  # fmt: skip
    p.add_argument("--subjects", type=int, default=24, help="subjects of the generated IJB-C folder")
    args = p.parse_args(argv)
    insightface = Path(args.insightface).resolve()
    if not (insightface / "recognition" / "arcface_torch" / "eval_ijbc.py").is_file():
        raise SystemExit(f"{insightface} is not a clone of insightface (no recognition/arcface_torch/eval_ijbc.py)")

    from mdkernels.eval import ijb
    from mdkernels.eval.synth_ijb import make_ijb_folder
    from mdkernels.interop.insightface import load_backbone

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "IJBC"
        truth = make_ijb_folder(folder, subjects=args.subjects, templates_per_subject=3, seed=0,
                                impostor_pairs=12 * args.subjects)  # fmt: skip
        sys.path.insert(0, str(insightface / "recognition" / "arcface_torch"))
        from backbones import get_model

        sys.path.pop(0)
        torch.manual_seed(0)  # the network's own initialisation, seeded: distinct scores (ties would make the
        net = get_model("r18", dropout=0, fp16=False)  # ROC's order, and so the check, hang on rounding)
        torch.save(net.state_dict(), work / "model.pt")

        theirs = insightface_1to1(insightface, folder, work / "model.pt", work)
        their_1n = insightface_1toN(insightface, folder, theirs["img_feats"], theirs["faceness"])
        ours = ijb.evaluate_ijb(load_backbone(work / "model.pt", "r18"), folder, batch_size=16, workers=0,
                                device="cpu", progress=False)  # fmt: skip

    our_tar = [round(100 * ours[f"tar@far={ijb._far_key(f)}"], 2) for f in ijb.FARS]
    diff = float(np.abs(ours["_scores"] - theirs["scores"]).max())
    our_1n = ours["1:N"]
    same_1n = all(math.isclose(our_1n[k], v, abs_tol=1e-9) for k, v in their_1n.items())
    ok = our_tar == theirs["tar"] and diff <= 1e-5 and same_1n
    lines = [
        f"IJB-C on a generated folder ({args.subjects} subjects, {truth['images']} images, {len(ours['_scores'])} "
        f"pairs), insightface r18 with seeded random weights, on the CPU",
        f"machine: {_cpu()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}",
        f"mdkernels commit {_git(REPO)}, insightface commit {_git(insightface)}",
        "",
        f"1:1 TAR@FAR {[str(f) for f in ijb.FARS]} (percent)",
        f"  insightface eval_ijbc.py: {theirs['tar']}",
        f"  mdk eval:                 {our_tar}",
        f"  largest pair-score difference: {diff:.2e}",
        "1:N (N1D1F2)",
        f"  insightface ijb_1n.py: {their_1n}",
        f"  mdk eval:              { {k: our_1n[k] for k in their_1n} }",
        "",
        f"result: {'same' if ok else 'DIFFERENT'}",
    ]
    report = "\n".join(lines)
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
