"""npvae.memory: freed memory stays in the process where the C library is glibc.

The effect is checked by counting page faults, not by timing: after the call, a loop that
allocates four 12.8 MB arrays and frees them every round faults no page in after its first
round. Without the call, glibc gives the freed heap top back to the kernel and faults the
pages in again every round."""
import resource
import subprocess
import sys

import numpy as np
import pytest

from npvae import memory

GLIBC = memory._glibc_mallopt() is not None

LOOP = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from npvae.memory import keep_freed_memory
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # like a convolutional step: four 12.8 MB temporaries alive at once, then freed
    arrays = [np.ones(3_200_000, np.float32) for _ in range(4)]
    del arrays
for _ in range(3):  # the first rounds map the pages once
    step()
before = faults()
for _ in range(10):
    step()
print((faults() - before) / 10)
"""


def faults_per_round(mode):
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_arrays_are_reused_without_page_faults():
    assert faults_per_round("keep") < 10  # pages already mapped: none faulted in again
    assert faults_per_round("default") > 1000  # thousands of 4 KiB pages mapped afresh each round


def test_keep_freed_memory_says_whether_it_acted_and_can_be_repeated():
    assert memory.keep_freed_memory() is GLIBC
    assert memory.keep_freed_memory() is GLIBC  # idempotent
    a = np.ones(4_000_000)  # allocation still works afterwards
    assert a.sum() == 4_000_000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
