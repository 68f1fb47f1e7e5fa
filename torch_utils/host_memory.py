"""Host (CPU) memory policy of a training or generation process: keep freed heap memory.

PyTorch's CPU tensors come from the C library's malloc. glibc maps blocks above a
threshold afresh and unmaps them when freed (the threshold starts at 128 KiB and rises, as
mapped blocks are freed, to at most 32 MiB), and it hands the top of its heap back to the
OS whenever more than twice that threshold of it is free. A training step frees most of
its activations at the end of each phase, so the next phase page-faults them in again,
and every tensor of 32 MiB or more (a small128 batch's (4, 4, 16384, 32) texture renders,
a renderer's per-sample features) is mapped, faulted in and unmapped on every use. On a
virtual machine a page fault costs microseconds (the kernel zeroes every page on first
touch): in benchmarks/vs_original.py's small128 Next3D training step with glibc's
defaults, tens of thousands of faults per generator phase, and a fresh 12 MiB tensor took
35 ms to fill instead of 1 ms.

`keep_freed_memory()` serves blocks up to 1 GiB from the heap and never trims the heap,
from the start. The resident memory stays at the heap's high-water mark, which a training
or generation process reaches every step anyway. Where glibc refuses a threshold above
32 MiB (its limit in some versions), blocks from 32 MiB up are still mapped.
"""

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLDS = (2 ** 30, 32 * 2 ** 20)   # the first that glibc accepts (32 MiB: HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 2 ** 31 - 1                # an int: never, in practice

_state = {'kept': None}


def keep_freed_memory() -> bool:
    """Serve blocks up to 1 GiB (or 32 MiB) from malloc's heap and never trim the heap (glibc).

    Affects this process (and processes it forks later). Returns True when the policy is
    in effect: Linux with glibc, the settings accepted. Elsewhere nothing changes and it
    returns False. Decided once per process.
    """
    if _state['kept'] is None:
        _state['kept'] = _set_glibc_policy()
    return _state['kept']


def mmap_threshold() -> int:
    """The mmap threshold that keep_freed_memory set (bytes), 0 when the policy is not in effect."""
    return _state.get('threshold', 0) if _state['kept'] else 0


def _set_glibc_policy() -> bool:
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Setting either threshold turns glibc's adaptive rule off, so both are set (1 = accepted).
    for threshold in MMAP_THRESHOLDS:
        if mallopt(M_MMAP_THRESHOLD, threshold) == 1:
            _state['threshold'] = threshold
            return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return False
