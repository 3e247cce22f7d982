"""Times the greedy coreset loop per step and shows that its memory stays flat.

anomalib's loop allocates an N-sized temporary per step and its RSS grew to 24 GiB on 214k patches;
ours must keep RSS constant across steps. Example (with the package installed, ``pip install -e .``):

    python scripts/benchmark_coreset.py --n 214000 --dim 1024 --dtype float16 --max-steps 300
"""

import argparse
import time

import torch

from anomaly.methods.patchcore.coreset import coreset_sampler, greedy_k_center, random_projection


def rss_mib(field: str = "VmRSS") -> float:
    """Resident (``VmRSS``) or peak resident (``VmHWM``) memory of this process in MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=214000, help="number of patch features N")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension D")
    parser.add_argument("--projection-dim", type=int, default=128, help="random projection dimension P")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio (selects int(N * ratio))")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="loop precision")
    parser.add_argument("--max-steps", type=int, default=500, help="stop after this many greedy steps")
    parser.add_argument("--device", default="cpu", help="torch device of the features")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    sampler = coreset_sampler(args.ratio, args.projection_dim, dtype=dtype)
    steps = min(args.max_steps, sampler.num_selected(args.n))
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(args.n, args.dim, generator=generator).to(args.device)

    start = time.perf_counter()
    points = random_projection(features, args.projection_dim, generator, dtype)
    starts = torch.randperm(args.n, generator=generator)[:10].to(args.device)
    projection_s = time.perf_counter() - start
    greedy_k_center(points, 2, starts)  # warm-up: first-call allocations and kernel selection

    rss_before = rss_mib()
    start = time.perf_counter()
    selected = greedy_k_center(points, steps, starts)
    selected.cpu()  # waits for a GPU
    loop_s = time.perf_counter() - start
    rss_after = rss_mib()

    total = sampler.num_selected(args.n)
    threads = torch.get_num_threads()
    print(f"N={args.n} D={args.dim} P={args.projection_dim} dtype={args.dtype} threads={threads}")
    print(f"projection: {projection_s:.2f} s")
    print(
        f"greedy loop: {steps} steps, {loop_s / steps * 1e3:.2f} ms/step (incl. the N x S initial distances)"
    )
    print(f"full selection of {total} points would take about {loop_s / steps * total:.0f} s")
    print(f"RSS before loop {rss_before:.0f} MiB, after {rss_after:.0f} MiB, peak {rss_mib('VmHWM'):.0f} MiB")


if __name__ == "__main__":
    main()
