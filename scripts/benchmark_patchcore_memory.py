"""Peak memory of PatchCore's fit: every patch held in memory (the fit before the spill file, as a
reference computation) against PatchCore's fit today (patches spilled to a file, only their projection
in memory).

Each fit runs in a process of its own, since a process's peak resident set size (``ru_maxrss``) cannot be
reset; a fit's figure is that peak less the process's RSS just before the first patch (torch and the
package imported). tracemalloc would not do: torch's tensors are not Python allocations. The spill file
is written through the page cache, which is not the process's memory (no mapping). The patches come from a
stand-in for the backbone, a seeded random batch at a time, so no network or data set is needed; both fits
get the same patches, and the script checks that they select the same bank. Example:

    python scripts/benchmark_patchcore_memory.py --n 200000 --dim 1024

With ``--sizes``, only today's fit, once per training-set size, and the bytes per patch that each size adds
(the default backbone: Lite0 at 256 px has a 32 × 32 grid and D = 152). ``--max-steps`` stops the greedy
loop early: every ``[N]`` buffer is made before its first step, but later steps gather the pruning's
candidates and can raise the peak (docs/performance.md), so a shortened loop gives a lower bound:

    python scripts/benchmark_patchcore_memory.py --sizes 100 400 1600 --grid 32 --dim 152 --ratio 0.01
"""

import argparse
import hashlib
import json
import math
import resource
import subprocess
import sys
import time

import torch
from torch import Tensor, nn

from anomaly.methods.patchcore.coreset import coreset_sampler
from anomaly.methods.patchcore.model import PatchCore
from anomaly.methods.patchcore.nearest_neighbors import build_index

FITS = {
    "in memory": "all patches in memory, torch.cat, then select (the old fit, a reference computation)",
    "spilled": "PatchCore.fit: patches in a spill file, their projection in memory",
}


class GeneratedPatches(nn.Module):
    """Stands in for :class:`PatchFeatures`: image ids ``[B]`` -> patch features ``[B, grid, grid, D]``,
    seeded by the id and non-negative like pooled activations."""

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.dim, self.grid = dim, grid

    def forward(self, image_ids: Tensor) -> Tensor:
        shape = (1, self.grid, self.grid, self.dim)
        generated = [torch.randn(shape, generator=torch.Generator().manual_seed(int(i))) for i in image_ids]
        return torch.cat(generated).relu_()


def rss_bytes() -> int:
    """The process's resident memory now (``VmRSS``, Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not in /proc/self/status")


def fit(name: str, args: argparse.Namespace) -> dict:
    """Runs one fit in this process; its bank's hash, seconds and peak memory above the start."""
    batches = torch.arange(args.images).split(args.batch_size)
    patches = GeneratedPatches(args.dim, args.grid)
    num_patches = args.images * args.grid**2
    options = {
        "coreset_ratio": min(args.ratio, args.max_steps / num_patches) if args.max_steps else args.ratio,
        "projection_dim": args.projection_dim,
        "coreset_dtype": args.dtype,
    }
    start_rss, start = rss_bytes(), time.perf_counter()
    if name == "in memory":  # what PatchCore.collect and fit did before the spill file
        collected = [patches(ids).flatten(0, 2) for ids in batches]
        features = torch.cat(collected)  # [N, D]
        collected.clear()
        dtype = getattr(torch, args.dtype)
        sampler = coreset_sampler(options["coreset_ratio"], args.projection_dim, dtype=dtype)
        bank = features[sampler.select(features)].contiguous()
        del features
        build_index(bank)
    else:
        model = PatchCore(patches, **options)
        model.spill_dir = args.spill_dir
        for ids in batches:
            model.collect(ids)
        model.fit()
        bank = model.memory_bank
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"fit": name, "seconds": seconds, "peak_mib": (peak - start_rss) / 2**20,
            "start_mib": start_rss / 2**20, "bank": list(bank.shape),
            "bank_sha256": hashlib.sha256(bank.numpy().tobytes()).hexdigest()[:16]}  # fmt: skip


def child_fit(name: str, args: argparse.Namespace, num_patches: int) -> dict:
    """One fit of ``num_patches`` (rounded up to whole images) in a process of its own."""
    options = {"--n": num_patches, "--dim": args.dim, "--grid": args.grid, "--batch-size": args.batch_size,
               "--ratio": args.ratio, "--projection-dim": args.projection_dim, "--dtype": args.dtype,
               "--spill-dir": args.spill_dir, "--threads": args.threads,
               "--max-steps": args.max_steps}  # fmt: skip
    arguments = [str(part) for key, value in options.items() if value is not None for part in (key, value)]
    child = subprocess.run([sys.executable, __file__, *arguments, "--run", name],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(child.stdout.strip().splitlines()[-1])


def by_size(args: argparse.Namespace) -> None:
    """Today's fit at each number of images: its peak above the start, and per patch what each size added."""
    print(f"{args.grid}x{args.grid} patches per image, D = {args.dim}, P = {args.projection_dim}, ratio "
          f"{args.ratio}, coreset {args.dtype}, greedy steps <= {args.max_steps or 'all'}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print("images | patches | bank | peak above start (MiB) | start (MiB) | bytes per added patch | fit (s)")
    previous = None
    for images in args.sizes:
        num_patches = images * args.grid**2
        result = child_fit("spilled", args, num_patches)
        added = (
            ""
            if previous is None
            else round((result["peak_mib"] - previous[1]) * 2**20 / (num_patches - previous[0]))
        )
        print(f"{images} | {num_patches} | {result['bank'][0]} | {result['peak_mib']:.0f} | "
              f"{result['start_mib']:.0f} | {added} | {result['seconds']:.1f}", flush=True)  # fmt: skip
        previous = (num_patches, result["peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200_000, help="patches N (rounded up to whole images)")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension D")
    parser.add_argument("--grid", type=int, default=28, help="patch grid side per image (28: 224 px, layer2)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per collect() call")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio")
    parser.add_argument("--projection-dim", type=int, default=128, help="random projection dimension")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="coreset dtype")
    parser.add_argument("--spill-dir", default=None, help="folder of the spill file (default: TMPDIR)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--sizes", type=int, nargs="+", help="today's fit only, at these numbers of images")
    parser.add_argument("--max-steps", type=int, default=None, help="stop the greedy loop after these steps")
    parser.add_argument("--run", choices=list(FITS), help=argparse.SUPPRESS)  # one fit, in a child process
    args = parser.parse_args()
    args.images = math.ceil(args.n / args.grid**2)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.run:
        print(json.dumps(fit(args.run, args)))
        return
    if args.sizes:
        by_size(args)
        return

    num_patches = args.images * args.grid**2
    print(f"N = {num_patches} patches ({args.images} images x {args.grid}x{args.grid}), D = {args.dim}, "
          f"P = {args.projection_dim}, ratio {args.ratio}, coreset {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"all patches at full width: {num_patches * args.dim * 4 / 2**20:.0f} MiB")
    results = []
    for name, label in FITS.items():
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--run", name],
                               capture_output=True, text=True, check=True)  # fmt: skip
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        result = results[-1]
        print(f"{name:>9}: peak {result['peak_mib']:6.0f} MiB above its start ({result['start_mib']:.0f} "
              f"MiB), {result['seconds']:5.1f} s, bank {result['bank']}  [{label}]")  # fmt: skip
    print("same bank:", "yes" if len({result["bank_sha256"] for result in results}) == 1 else "NO")


if __name__ == "__main__":
    main()
