import platform
import resource

import pytest
import torch

from anomaly.allocator import keep_freed_memory_for_reuse


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_freed_tensor_memory_is_reused_without_page_faults():
    assert keep_freed_memory_for_reuse()
    torch.ones(16 * 2**20)  # 64 MB: above glibc's largest mmap threshold, freed at once
    before = minor_page_faults()
    torch.ones(16 * 2**20)
    assert minor_page_faults() - before < 1000  # 16,384 pages of 4 KiB if it came fresh from the OS
