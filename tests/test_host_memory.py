"""torch_utils.host_memory: tensors come from malloc's heap, and freed memory stays there."""

import json
import os
import platform
import subprocess
import sys

import pytest

from torch_utils import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process (the policy is process-wide): two tensors of argv[2] MiB, written and
# freed together (a phase's activations). How much malloc mapped for them, and how much
# resident memory went back to the OS when they were freed.
CHILD = r'''
import ctypes, json, sys
import torch
from torch_utils import host_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks',
                                                'uordblks', 'fordblks', 'keepcost')]
libc = ctypes.CDLL('libc.so.6')
libc.mallinfo2.restype = Mallinfo2
resident_mib = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2 ** 20

kept = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else None
mapped_before = libc.mallinfo2().hblkhd
n = int(sys.argv[2]) * 2 ** 18
a, b = torch.empty(n), torch.empty(n)
a.fill_(1.0), b.fill_(2.0)
mapped = (libc.mallinfo2().hblkhd - mapped_before) / 2 ** 20
in_use = resident_mib()
del a, b
print(json.dumps(dict(kept=kept, again=host_memory.keep_freed_memory() if kept else None,
                      threshold=host_memory.mmap_threshold(), mapped_mib=mapped,
                      returned_mib=in_use - resident_mib())))
'''


def run_child(mode, mib):
    out = subprocess.run([sys.executable, '-c', CHILD, mode, str(mib)], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc', reason='glibc only')
@pytest.mark.parametrize('mib', [24, 48])
def test_tensors_stay_in_the_heap(mib):
    kept = run_child('keep', mib)
    assert kept['kept'] is True and kept['again'] is True
    assert kept['threshold'] in host_memory.MMAP_THRESHOLDS
    if mib * 2 ** 20 >= kept['threshold']:
        pytest.skip(f"this glibc keeps mapping blocks of {kept['threshold'] >> 20} MiB and more")
    assert kept['mapped_mib'] < 1 and abs(kept['returned_mib']) < 1, kept
    # glibc's defaults: the first blocks of this size are mapped, and unmapped again when freed.
    default = run_child('default', mib)
    assert default['kept'] is None and default['threshold'] == 0
    assert default['mapped_mib'] > 2 * mib - 1 and default['returned_mib'] > 2 * mib - 1, default


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory, '_state', {'kept': None})
    monkeypatch.setattr(platform, 'libc_ver', lambda: ('musl', '1.2'))
    assert host_memory.keep_freed_memory() is False
    assert host_memory.keep_freed_memory() is False
