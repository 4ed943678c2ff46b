"""Cosine top-k against what users pick for exact search: time and extra memory.

    python -m bench.bench_cosine_topk                          # CPU: Q=2000, G=200,000, D=512, k=10
    python -m bench.bench_cosine_topk --Q 1000 --G 1000000 --device cuda

Providers: ``mdk_torch`` (gallery chunks, the C++ sweep per row), ``mdk_triton`` (GPU), ``faiss`` (``IndexFlatIP``
on the same normalised rows, where ``faiss-cpu``/``faiss-gpu`` is installed; the index is built outside the timing,
as a user builds it once), ``torch_chunked`` (a plain loop: ``n(Q) @ n(G_chunk)^T``, ``topk``, merge), and
``reference`` (the full ``Q x G`` matrix and one ``topk``, where it fits). The extra memory is the peak above the
inputs (a child process per provider on the CPU), to compare with the ``Q x G`` scores' size.
Rows go to bench/results/<device>.csv (op ``cosine_topk``).
"""

from __future__ import annotations

import argparse
import math

import torch

from bench import harness

OPS = ["cosine_topk"]  # this module's bench key (the registry's name)


def make_inputs(Q, G, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    gallery = torch.randn(G, D, generator=g).to(device)
    queries = torch.randn(Q, D, generator=g).to(device)
    queries[: Q // 2] += 2 * gallery[torch.randint(0, G, (Q // 2,), generator=g)].to(device)  # true matches
    return queries, gallery


def torch_chunked(queries, gallery, k, chunk=8192):
    """What a user writes without a library: normalised chunks, ``topk`` per chunk, a merge."""
    qn = torch.nn.functional.normalize(queries, dim=1)
    vals = torch.full((queries.shape[0], k), -math.inf, device=queries.device)
    idx = torch.full((queries.shape[0], k), -1, dtype=torch.long, device=queries.device)
    for c0 in range(0, gallery.shape[0], chunk):
        s = qn @ torch.nn.functional.normalize(gallery[c0 : c0 + chunk], dim=1).T
        tv, ti = s.topk(min(k, s.shape[1]), dim=1)
        vals, pick = torch.cat([vals, tv], 1).topk(k, dim=1)
        idx = torch.cat([idx, ti + c0], 1).gather(1, pick)
    return vals, idx


def providers(device: str, queries, gallery, k: int) -> dict:
    """name -> a call returning (values, indices); faiss's index is built here, outside the timing."""
    import mdkernels

    out = {"mdk_torch": lambda: mdkernels.cosine_topk(queries, gallery, k, backend="torch")}
    info = mdkernels.info()
    if device == "cuda" or (info["triton_available"] and info["triton_interpret"]):
        out["mdk_triton"] = lambda: mdkernels.cosine_topk(queries, gallery, k, backend="triton")
    out["torch_chunked"] = lambda: torch_chunked(queries, gallery, k)
    if queries.shape[0] * gallery.shape[0] <= 2**30 // (1 if device == "cuda" else 2):
        out["reference"] = lambda: mdkernels.cosine_topk(queries, gallery, k, backend="reference")
    try:
        import faiss  # noqa: F401
    except ImportError:
        return out
    out["faiss"] = _faiss(queries, gallery, k, device)
    return out


def _faiss(queries, gallery, k, device):
    import faiss
    import numpy as np

    dim = gallery.shape[1]
    g = np.ascontiguousarray(torch.nn.functional.normalize(gallery.float(), dim=1).cpu().numpy())
    index = faiss.IndexFlatIP(dim)
    if device == "cuda" and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(g)

    def search():
        q = np.ascontiguousarray(torch.nn.functional.normalize(queries.float(), dim=1).cpu().numpy())
        return index.search(q, k)

    return search


def child(spec: dict) -> None:
    """Subprocess body: the peak RSS rise of one call (after a warm-up at full size)."""
    queries, gallery = make_inputs(spec["Q"], spec["G"], spec["D"], "cpu")
    call = providers("cpu", queries, gallery, spec["k"])[spec["provider"]]
    call()
    if not harness.reset_peak_rss():
        raise SystemExit("cannot reset the peak RSS on this OS: CPU peak memory needs Linux")
    base = harness.current_rss_bytes()
    call()
    print(harness.maxrss_bytes() - base)


def run(Q, G, D, k, device, reps, only, threads):
    import mdkernels

    if device == "cpu":
        torch.set_num_threads(threads)
        try:
            import faiss

            faiss.omp_set_num_threads(threads)
        except ImportError:
            pass
    queries, gallery = make_inputs(Q, G, D, device)
    calls = {n: c for n, c in providers(device, queries, gallery, k).items() if not only or n in only}
    truth = mdkernels.cosine_topk(queries, gallery, k, backend="torch")
    measured = harness.time_cpu_interleaved(calls, reps=reps) if device == "cpu" else {}
    rows, versus = [], {}
    for name, call in calls.items():
        spec = dict(provider=name, Q=Q, G=G, D=D, k=k)
        med, p20, p80, peak = harness.measure(call, device, "bench_cosine_topk", spec, measured.get(name))
        vals, idx = call()
        agree = float(torch.as_tensor(vals).to(truth[0].device, truth[0].dtype).sub(truth[0]).abs().max())
        same_idx = float((torch.as_tensor(idx).to(truth[1].device).long() == truth[1]).float().mean())
        versus[name] = {"ms": round(med, 1), "extra_mib": round(int(peak) / 2**20, 1), "max_value_diff": agree,
                        "same_indices": same_idx}  # fmt: skip
        row = harness.base_row("cosine_topk", device)
        row.update(provider=name, mode="search", B=Q, D=D, C=G, dtype="float32", ms_median=med, ms_p20=p20,
                   ms_p80=p80, peak_mem_bytes=peak, tflops=round(2 * Q * G * D / (med * 1e-3) / 1e12, 3))  # fmt: skip
        rows.append(row)
        print(f"{name:>14} {med:10.1f} ms  extra {int(peak) / 2**20:9.1f} MiB  (Q x G scores: "
              f"{Q * G * 4 / 2**20:.0f} MiB)  max |value - mdk| {agree:.1e}, same indices {same_idx:.4f}",
              flush=True)  # fmt: skip
    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    record = {"what": "cosine_topk", "Q": Q, "G": G, "D": D, "k": k, "threads": threads, "faiss": faiss_version,
              "against": "mdk torch backend", "providers": versus}  # fmt: skip
    return rows, record


def main(argv=None) -> None:
    if harness.ran_as_child(argv, child):
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--Q", type=int, default=2000, help="queries")
    p.add_argument("--G", type=int, default=200_000, help="gallery rows")
    p.add_argument("--D", type=int, default=512, help="embedding size")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (torch and faiss)")
    p.add_argument("--only", nargs="*", help="providers to run")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    rows, record = run(args.Q, args.G, args.D, args.k, args.device, args.reps, args.only, args.threads)
    if not args.no_save:
        print("appended to", harness.append_rows(rows, args.device))
        print("appended to", harness.append_record(record, args.device, "search"))


if __name__ == "__main__":
    main()
