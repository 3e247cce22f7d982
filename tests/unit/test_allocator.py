"""The malloc settings of anomaly/allocator.py: freed memory is kept for the next batch (no page faults)
until it is released."""

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")

# Batches of large temporaries, as a backbone makes them; counts the page faults of the later batches.
WORKLOAD = """
import json, resource, sys, torch
from anomaly.allocator import keep_freed_memory_for_reuse, release_freed_memory
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def batch():
    x = torch.ones(32, 64, 64, 64)  # 32 MB
    return float(torch.nn.functional.conv2d(x, torch.ones(64, 64, 1, 1)).sum())
if sys.argv[1] == "reuse":
    assert keep_freed_memory_for_reuse()
batch()
start = faults()
for _ in range(4):
    batch()
steady = faults() - start
release_freed_memory()
start = faults()
batch()
print(json.dumps({"steady": steady, "after_release": faults() - start}))
"""


def page_faults(mode: str) -> dict[str, int]:
    command = [sys.executable, "-c", WORKLOAD, mode]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.mark.slow
def test_freed_memory_is_reused_without_page_faults_until_released():
    default, reuse = page_faults("default"), page_faults("reuse")
    assert reuse["steady"] < default["steady"] / 2  # measured: 24.6k against 131k
    batch_pages = 2 * 32 * 2**20 // 4096
    assert reuse["after_release"] > batch_pages / 2  # handed back: the next batch gets new pages
