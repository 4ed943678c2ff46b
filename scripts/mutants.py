"""The suite against deliberate bugs: each mutant is a one-line change to a copy of the package under test, and the
tests of that part must fail on it (the mutant is "killed").

    python scripts/mutants.py                 # every mutant (about 10 minutes on 2 cores)
    python scripts/mutants.py --only sampling memory-bxc

For each mutant: the installed (or checked-out) ``mdkernels`` is copied with its built modules into a temporary
folder, the one line is replaced (the original text must occur exactly once), and the mutant's tests run in a fresh
process whose ``PYTHONPATH`` puts the copy first (checked: the run prints the package it imported). A mutant that
the tests let pass "survives", and the script exits non-zero. The list covers each headline contract of each op
and module, sampling, sharding, bad input, checkpoints and evaluation; docs/testing.md gives it with the last
result.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "python_tests"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # inside the package
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments (node ids or -k expressions), relative to python_tests/
    what: str


def t(*args: str) -> tuple[str, ...]:
    return args


MUTANTS = [
    # ---- the margin CE core ----------------------------------------------------------------------------------
    Mutant("slope-m1", "ops/_common/margin.py", "slope = s * m1 * torch.sin(phi_d) / torch.sin(theta_d)",
           "slope = s * torch.sin(phi_d) / torch.sin(theta_d)",
           t("test_every_op.py", "test_margin_ce.py", "-k", "matches_reference and torch"),
           "the exact target derivative loses its m1 (SphereFace's gradient)"),
    Mutant("fallback-threshold", "ops/_common/margin.py", "use = cos_t < torch.cos(math.pi - m2)",
           "use = cos_t > torch.cos(math.pi - m2)", t("test_margin_ce.py", "-k", "matches_reference and torch"),
           "the monotonic fallback applies on the wrong side of pi - m2"),
    Mutant("target-lse", "ops/margin_ce/op.py", "lse = torch.where(valid, torch.logaddexp(lse_nt, z_t), lse_nt)",
           "lse = torch.where(valid, torch.maximum(lse_nt, z_t), lse_nt)", t("test_every_op.py"),
           "the target logit is merged into the logsumexp by a max"),
    Mutant("filter-off", "ops/margin_ce/torch_backend.py", "nt.tau is not None, m.data_ptr()", "False, m.data_ptr()",
           t("test_margin_ce.py", "-k", "matches_reference and torch and filter"),
           "the CPU's fused forward ignores the inter-class filter"),
    Mutant("triton-center-grad", "ops/_common/tiles.py",
           "        proj = tl.where(rw >= _ZERO_ROW_RW, 0.0, dot * rw * rw)", "        proj = tl.where(rw >= _ZERO_ROW_RW, 0.0, dot * 0.0)",
           t("test_every_op.py", "-k", "triton"),
           "the Triton center gradient drops the normalisation backward's projection"),
    # ---- memory: seen inside the ops (mdkernels.ops._common.probe) ------------------------------------------
    Mutant("memory-bxc", "ops/margin_ce/op.py", "    labels = labels.long()\n    valid = label_mask(",
           "    labels = labels.long()\n    _ = torch.empty(x.shape[0], w.shape[0], device=x.device)\n    valid = label_mask(",
           t("test_memory_probes.py", "-k", "ArcFace and torch"), "the margin-CE forward allocates a B x C tensor"),
    Mutant("memory-centers-copy", "ops/margin_ce/op.py", "    labels = labels.long()\n    valid = label_mask(",
           "    labels = labels.long()\n    w = w.clone()\n    valid = label_mask(",
           t("test_memory_probes.py", "-k", "ArcFaceLoss and torch or distillation and torch"),
           "the margin-CE forward copies the centers"),
    Mutant("memory-qxg", "ops/cosine_topk/torch_backend.py",
           "    return max(k, min(G, max(256, CHUNK_ELEMENTS // max(Q, 1))))", "    return G",
           t("test_memory_probes.py", "-k", "cosine"), "cosine top-k scores the whole gallery at once"),
    # ---- sampling and sharding -------------------------------------------------------------------------------
    Mutant("sampling-detached", "distributed.py", "        w = local_centers[index]\n",
           "        w = local_centers[index].detach()\n", t("test_distributed.py", "-k", "sampling"),
           "Partial FC's sampled centers never train"),
    Mutant("sharded-grad-scale", "distributed.py", "        return (out * ctx.scale if ctx.scale != 1.0 else out), None, None",
           "        return out, None, None", t("test_distributed.py", "-k", "ddp"),
           "the sharded head forgets DDP's 1/world on the embeddings' gradient"),
    # ---- distillation ------------------------------------------------------------------------------------------
    Mutant("proxyless-margin", "nn/distill.py",
           "        return F_.proxyless_kd_loss(embeddings.to(w.dtype), w, labels, margin=self.margin, s=self.s, m=self.m,",
           "        return F_.proxyless_kd_loss(embeddings.to(w.dtype), w, labels, margin=self.margin, s=self.s, m=0.0,",
           t("test_every_module.py", "-k", "ProxylessKD"), "nn.ProxylessKD drops its margin"),
    Mutant("margindistill-dmax", "ops/_common/margin.py", "        margins = teacher_cos.detach() * ((m_max - m_min) / d) + m_min",
           "        margins = teacher_cos.detach() * ((m_max - m_min) / 1.0) + m_min",
           t("test_every_module.py", "-k", "MarginDistillation or margin_distillation"),
           "MarginDistillation's margins ignore Dmax"),
    Mutant("kd-temperature", "ops/margin_kd/op.py",
           "(1 - alpha) * (lse_s - z_ts) + alpha * T * T * kl", "(1 - alpha) * (lse_s - z_ts) + alpha * T * kl",
           t("test_every_module.py", "-k", "MarginKD or margin_kd"), "margin KD loses a factor T"),
    Mutant("angular-power", "ops/angular_distill/torch_backend.py", "    return (1 - cos).clamp_min(0).pow(p), ns, nt, cos",
           "    return (1 - cos).clamp_min(0), ns, nt, cos", t("test_every_module.py", "-k", "ngular and torch"),
           "angular distillation ignores p"),
    Mutant("triplet-margin", "ops/triplet_distill/torch_backend.py", "    slope = (m_max - m_min) / d_max.clamp_min(EPS)",
           "    slope = (m_max - m_min) / d_max.clamp_min(EPS) * 0", t("test_every_module.py", "-k", "riplet and torch"),
           "triplet distillation's margin ignores the teacher's gap"),
    Mutant("adadistill-alpha", "ops/_common/centers.py",
           "    a = ((s * t).sum(1).clamp(-1.0, 1.0) * lam).clamp(ADADISTILL_ALPHA_MIN, 1.0)",
           "    a = (s * t).sum(1).clamp(ADADISTILL_ALPHA_MIN, 1.0)", t("test_every_module.py", "-k", "dadistill and torch"),
           "AdaDistill's alpha forgets the teacher-center cosine"),
    # ---- the margin family -------------------------------------------------------------------------------------
    Mutant("adaface-ema", "nn/margins.py", "                a = self.t_alpha\n", "                a = 1 - self.t_alpha\n",
           t("test_margin_family.py", "-k", "test_head_matches_reference and adaface and torch"),
           "AdaFace's norm statistics move at the wrong rate"),
    Mutant("curricular-t", "nn/margins.py",
           "(1 - self.momentum) * self.t + self.momentum * mean.to(self.t)", "self.t + mean.to(self.t)",
           t("test_margin_family.py", "-k", "test_head_matches_reference and curricular and torch"),
           "CurricularFace's t is not an EMA"),
    Mutant("magface-regulariser", "nn/margins.py", "        return ce + self.lambda_g * g", "        return ce - self.lambda_g * g",
           t("test_every_module.py", "-k", "MagFace and torch"), "MagFace's norm regulariser has the wrong sign"),
    Mutant("subcenter-max", "ops/_common/chunked.py", "        z, kidx = z.view(z.shape[0], c1 - c0, K).max(2)",
           "        z, kidx = z.view(z.shape[0], c1 - c0, K).min(2)",
           t("test_every_module.py", "-k", "SubCenter and torch"), "sub-center ArcFace takes the farthest sub-center"),
    # ---- l2norm, search -----------------------------------------------------------------------------------------
    Mutant("l2norm-backward", "ops/l2norm.py", "            torch.addcmul(gc, xc, proj, value=-1.0, out=oc).mul_(inv)",
           "            oc.copy_(gc).mul_(inv)", t("test_every_module.py", "-k", "l2_normalize"),
           "the normalisation backward drops its projection"),
    Mutant("topk-offset", "ops/cosine_topk/torch_backend.py", "rgc.data_ptr(), c0, Q, c1 - c0, k,",
           "rgc.data_ptr(), 0, Q, c1 - c0, k,", t("test_cosine_topk.py", "-k", "cpp_sweep or exact_top_k and torch"),
           "the CPU search forgets each gallery chunk's offset (wrong identities)"),
    # ---- bad input -----------------------------------------------------------------------------------------------
    Mutant("scale-check", "_validate.py", "    if not math.isfinite(float(s)) or float(s) <= 0:",
           "    if not math.isfinite(float(s)) or float(s) < 0:", t("test_bad_input.py", "-k", "bad_argument"),
           "s = 0 is accepted"),
    Mutant("label-range", "_validate.py", "    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))",
           "    bad = (labels != ignore_index) & ((labels < 0) | (labels > num_classes))",
           t("test_bad_input.py", "test_sync_free.py"), "a label equal to C is accepted"),
    Mutant("cli-traceback", "cli.py", "    except (ValueError, OSError, RuntimeError, FloatingPointError) as err:",
           "    except (FloatingPointError,) as err:", t("test_bad_input.py", "-k", "cli"),
           "the CLI prints a traceback for a user's mistake"),
    # ---- checkpoints and training -----------------------------------------------------------------------------
    Mutant("checkpoint-previous", "models/checkpoint.py", "        if keep_previous and path.is_file():",
           "        if False:", t("test_train.py", "-k", "checkpoint_faults"),
           "a crash while saving loses the previous checkpoint"),
    Mutant("resume-optimizer", "train/trainer.py", '        opt.load_state_dict(state["optimizer"])\n',
           "        pass\n", t("test_train.py", "-k", "resume_after_a_kill"),
           "resume restarts the optimizer's momentum"),
    # ---- evaluation -----------------------------------------------------------------------------------------------
    Mutant("kfold-leak", "eval/verification.py", "        t = _best_threshold(scores[~test], issame[~test])",
           "        t = _best_threshold(scores, issame)", t("test_train.py", "-k", "kfold"),
           "the 10-fold protocol picks its threshold on the test fold too"),
    Mutant("ijb-media-pooling", "eval/ijb.py", "        media_feats = [np.mean(feats[g], axis=0) for g in np.split(rows, cuts)]",
           "        media_feats = [np.sum(feats[g], axis=0) for g in np.split(rows, cuts)]",
           t("test_ijb.py", "-k", "template_features or pipeline_equals"), "IJB media are summed instead of averaged"),
    Mutant("ijb-far-pick", "eval/ijb.py", "    fpr_r, tpr_r = np.flipud(fpr), np.flipud(tpr)",
           "    fpr_r, tpr_r = fpr, tpr", t("test_ijb.py", "-k", "tar_ties or tar_nearest"),
           "TAR at FAR takes the first of the equally near ROC points, not the last"),
    # ---- the backend rule -------------------------------------------------------------------------------------------
    Mutant("dispatch-winner", "backends.py", '    return "cuda" if best["ms_cuda"] < best["ms_triton"] else "triton"',
           '    return "cuda" if best["ms_cuda"] > best["ms_triton"] else "triton"', t("test_dispatch.py"),
           "auto picks the slower backend"),
]


def package_dir() -> Path:
    out = subprocess.run([sys.executable, "-c", "import mdkernels, os; print(os.path.dirname(mdkernels.__file__))"],
                         capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())  # fmt: skip
    return Path(out.stdout.strip())


def run_mutant(m: Mutant, package: Path, work: Path, timeout: int) -> tuple[str, float, str]:
    """("killed" | "SURVIVED" | "error: ...", seconds, the tail of the test output)."""
    copy = work / m.name
    shutil.copytree(package, copy / "mdkernels", ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "mdkernels" / m.file
    text = target.read_text()
    if text.count(m.old) != 1:
        return f"error: the original line occurs {text.count(m.old)} times in {m.file}", 0.0, ""
    target.write_text(text.replace(m.old, m.new))
    env = {**os.environ, "PYTHONPATH": str(copy), "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    check = subprocess.run([sys.executable, "-c", "import mdkernels; print(mdkernels.__file__)"], env=env,
                           capture_output=True, text=True, cwd=work)  # fmt: skip
    if not check.stdout.strip().startswith(str(copy)):
        return f"error: the mutant's copy was not imported ({check.stdout.strip() or check.stderr[-300:]})", 0.0, ""
    selection = [str(TESTS / a) if a.endswith(".py") or ".py::" in a else a for a in m.tests]
    cmd = [sys.executable, "-m", "pytest", *selection, "-x", "-q", "-rfE", "-p", "no:cacheprovider", "--no-header"]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error: the tests ran past the time limit", time.perf_counter() - t0, ""
    seconds = time.perf_counter() - t0
    lines = (res.stdout + res.stderr).strip().splitlines()
    if res.returncode == 5:  # no test collected: the selection is wrong
        return "error: no test selected", seconds, "\n".join(lines[-3:])
    if res.returncode == 0:
        return "SURVIVED", seconds, "\n".join(lines[-3:])
    failed = [ln for ln in lines if ln.startswith("FAILED ")]
    if not failed:  # an error (collection, import): the mutant broke the code, not a test's check
        return "error: no test failed (an error instead)", seconds, "\n".join(lines[-5:])
    return "killed", seconds, failed[0].split("python_tests/")[-1][:160]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="mutant names to run (default: all)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per mutant's tests")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "mutants.txt"),
                   help="where the report goes (with the machine, versions and commit); '' for none")  # fmt: skip
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:22s} {m.file:38s} {m.what}")
        return 0
    package = package_dir()
    print(f"{len(chosen)} mutants of {package}", flush=True)
    import platform

    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""  # fmt: skip
    report = [f"scripts/mutants.py at commit {commit.strip()}: {cpu}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}, torch {torch.__version__}", ""]  # fmt: skip
    bad, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for m in chosen:
            outcome, seconds, tail = run_mutant(m, package, Path(tmp), args.timeout)
            lines = [f"{outcome:8s} {seconds:6.1f}s  {m.name:22s} {m.what}", "    " + tail.replace("\n", "\n    ")]
            print("\n".join(lines), flush=True)  # the test that caught it, or why not
            report += lines
            if outcome != "killed":
                bad.append(m.name)
    summary = (f"{len(chosen) - len(bad)} of {len(chosen)} killed in {(time.perf_counter() - t0) / 60:.1f} min"
               + (f"; not killed: {', '.join(bad)}" if bad else ""))  # fmt: skip
    print(summary)
    if args.out and not args.only:
        Path(args.out).write_text("\n".join(report + ["", summary]) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
