"""What PatchCore's fit holds in memory per training patch: the projected points and a few bytes of greedy
state, nothing more (issue 28: an all-at-once float32 copy of the points made it ~810 bytes per patch).

Measured as the peak resident memory of a fresh process (Linux ``/proc``): torch's tensors are not Python
allocations, so tracemalloc does not see them, and a pytest process keeps freed pages that could hide a
temporary. The peak is the process's own high-water mark (``VmHWM``, reset where it starts counting), not
``ru_maxrss``, which Linux carries over from the parent through fork and exec (in CI, the pytest process's
gigabytes).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from anomaly.methods.patchcore.reproducible import PROJECTION_BLOCK_ROWS

NUM_POINTS = 131_072  # patches in the spill: enough that per-point bytes dwarf the fixed blocks
DIM, PROJECTION_DIM = 160, 128
# per point: the float16 point, then < 128 bytes of greedy state (distance, norm, pruning) and temporaries
BYTES_PER_POINT = 2 * PROJECTION_DIM + 128
# fixed: a block of rows read from the spill, the same block centred, and its product with the projection
FIXED_BYTES = PROJECTION_BLOCK_ROWS * (2 * DIM + PROJECTION_DIM) * 4

_FIT = textwrap.dedent(f"""
    import json, torch
    from anomaly.methods.patchcore.coreset import ApproximateGreedyCoreset
    from anomaly.methods.patchcore.spill import PatchSpill

    def status(field):
        with open("/proc/self/status") as lines:
            return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

    generator = torch.Generator().manual_seed(0)  # then a warm-up: first-call allocations are not counted
    ApproximateGreedyCoreset(0.002, {PROJECTION_DIM}, dtype=torch.float16).select(torch.rand(2000, {DIM}))
    with PatchSpill() as spill:
        for _ in range({NUM_POINTS} // 8192):
            spill.append(torch.rand(8192, {DIM}, generator=generator))
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM from here on
        start = status("VmRSS")
        sampler = ApproximateGreedyCoreset(4 / {NUM_POINTS}, {PROJECTION_DIM}, dtype=torch.float16)
        selected = sampler.select(spill)
        peak = status("VmHWM")
    print(json.dumps({{"above_start": peak - start, "selected": len(selected)}}))
""")


@pytest.mark.slow  # a fresh process that imports torch and projects 131k patches: ~10 s of CPU
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from Linux's /proc")
def test_the_coreset_holds_the_projected_points_and_a_few_bytes_per_point() -> None:
    """The greedy selection from a spill file (what ``PatchCore.fit`` runs) peaks at the float16 points
    ``[N, 128]`` plus < 128 bytes per point plus fixed blocks; before the fix its squared norms copied
    every point to float32 first (+512 bytes per point)."""
    child = subprocess.run([sys.executable, "-c", _FIT], capture_output=True, text=True, check=True)
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    assert measured["selected"] == 4
    points = NUM_POINTS * 2 * PROJECTION_DIM
    assert points < measured["above_start"]  # the measurement sees the points themselves
    bound = NUM_POINTS * BYTES_PER_POINT + FIXED_BYTES
    above = measured["above_start"]
    assert above < bound, f"{above / 2**20:.0f} MiB above the start, over {bound / 2**20:.0f}"
