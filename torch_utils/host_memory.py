"""Host (CPU) memory policy of a training or generation process: keep freed heap memory.

PyTorch's CPU tensors come from the C library's malloc. glibc maps blocks above a
threshold afresh and unmaps them when freed (the threshold starts at 128 KiB and rises, as
mapped blocks are freed, to at most 32 MiB), and it hands the top of its heap back to the
OS whenever more than twice that threshold of it is free. A generator step frees most of its activations at the end of each phase, so the
next phase page-faults them in again: the kernel zeroes every page on first touch, about
eight times the cost of writing a warm page on the 2-core VM of benchmarks/vs_original.py.

`keep_freed_memory()` fixes glibc's two thresholds where its own adaptive rule ends up
for large tensors, from the start: blocks below 32 MiB come from the heap, and the heap
is never trimmed. Blocks of 32 MiB and more are still mapped and unmapped (glibc's
limit). The resident memory stays at the heap's high-water mark, which a training or
generation process reaches every step anyway. Measured on that VM (small128, batch 4,
one thread, 5 interleaved pairs against glibc's defaults): a Next3D generator step
(Gmain) 0.76x the time, a training step 0.83x, inference 0.92x.
"""

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2 ** 20       # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 2 ** 31 - 1        # an int: never, in practice

_state = {'kept': None}


def keep_freed_memory() -> bool:
    """Serve blocks below 32 MiB from malloc's heap and never trim the heap (glibc).

    Affects this process (and processes it forks later). Returns True when the policy is
    in effect: Linux with glibc, both settings accepted. Elsewhere nothing changes and it
    returns False. Decided once per process.
    """
    if _state['kept'] is None:
        _state['kept'] = _set_glibc_policy()
    return _state['kept']


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
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
