"""Where ``vcell.bench.run``'s memory goes: RSS sampled with the Python stack while it runs.

Runs what ``benchmarks/scale.py``'s ``bench.run`` row runs (the four baselines, one ``unseen_perturbation`` split
with ``test_frac=0.2``, seed 0, ``cell_type`` as covariate, on the h5ad read with ``backed="r"``; torch imported
first with ``--threads`` threads, as scale.py's child does) and, every 0.1 s, records the process's resident memory
and the vcell frames of the main thread.

Outputs, beside ``OUT_PREFIX``: ``.trace`` (one line per sample: seconds, RSS in GiB, the innermost vcell frames),
``.peaks`` (the full stack each time RSS passes its previous peak by 20 MiB) and ``.csv`` (``bench.run``'s results,
to compare two versions of the code value by value). The last line printed holds the wall time and the peak RSS
(``ru_maxrss``). ``--tracemalloc`` also records the live Python/numpy allocations (tracemalloc's current and peak,
``tm_cur``/``tm_peak``): slow (several times the wall time), and it inflates RSS; compare its live figures only.

Usage: ``python benchmarks/bench_memory.py /tmp/vcell_scale/nb1_100000x2000_p100_t3_s0.h5ad /tmp/prof/run100k
[--threads 2] [--tracemalloc]``. To separate live memory from what glibc's allocator keeps, run it again with
``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 MALLOC_ARENA_MAX=2`` in the environment.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path


def _rss_gib() -> float:
    with Path("/proc/self/status").open() as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def main() -> None:
    """Parse the arguments, start the sampler and run ``bench.run``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="h5ad file (benchmarks/scale.py's cache)")
    parser.add_argument("prefix", help="output prefix (.trace, .peaks, .csv)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(1)
    main_id = threading.main_thread().ident
    t00 = time.time()
    trace = Path(args.prefix + ".trace").open("w")  # written by the sampler thread until the process exits
    peaks = Path(args.prefix + ".peaks").open("w")

    def sample() -> None:
        peak = 0.0
        while True:
            rss = _rss_gib()
            stack = traceback.extract_stack(sys._current_frames().get(main_id))
            frames = [f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in stack if "vcell" in f.filename]
            extra = ""
            if args.tracemalloc:
                cur, top = tracemalloc.get_traced_memory()
                extra = f" tm_cur={cur / 1024**3:.3f} tm_peak={top / 1024**3:.3f}"
            trace.write(f"{time.time() - t00:.1f} {rss:.3f}{extra} {' > '.join(frames[-4:])}\n")
            trace.flush()
            if rss > peak + 0.02:
                peak = rss
                peaks.write(f"--- t={time.time() - t00:.1f} RSS {rss:.3f} GiB{extra}\n")
                peaks.write("".join(traceback.format_list(stack[-10:])) + "\n")
                peaks.flush()
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    import torch

    torch.set_num_threads(args.threads)
    import anndata as ad

    import vcell

    print("vcell", vcell.__file__, "import RSS GiB", round(_rss_gib(), 3), flush=True)
    adata = ad.read_h5ad(args.path, backed="r")
    t0 = time.time()
    res = vcell.bench.run(
        adata,
        models=["control", "mean", "additive", "linear"],
        splits=[{"kind": "unseen_perturbation", "test_frac": 0.2}],
        seeds=[0],
        perturbation_key="perturbation",
        control="control",
        covariate_keys=["cell_type"],
        on_error="skip",
        progress=False,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"done wall_s {time.time() - t0:.1f} peak_rss_gib {peak:.3f}", flush=True)
    if args.tracemalloc:
        print(f"tracemalloc peak GiB {tracemalloc.get_traced_memory()[1] / 1024**3:.3f}", flush=True)
    res.results.to_csv(args.prefix + ".csv", index=False)


if __name__ == "__main__":
    main()
