"""The run folder: its number, the names of its snapshots, the lock of the run writing it, stale temporary files.

    outdir/NNNNN-<desc>/network-snapshot-KKKKKK.KKK.pkl     KKKKKK.KKK = kimg with three decimals

A snapshot's name is the exact image count, so names never repeat within a run (fractional
ticks and stop snapshots included) and sort in training order. Rank 0 of a run holds an
advisory lock (flock) on its folder while it trains: temporary files of interrupted atomic
writes (`.<name>.<8 characters>.tmp`, torch_utils.persistence.atomic_output) are removed
only from a folder whose lock is free, so a live run never loses a file it is writing.
"""

import fcntl
import os
import re
import weakref

_RUN_ID = re.compile(r'^(\d+)')
_STALE_TEMP = re.compile(r'^\.(?:network-snapshot-.+\.pkl|fakes.*\.png|reals\.png)\.[a-z0-9_]{8}\.tmp$')   # what a run writes


def kimg_stamp(nimg: int) -> str:
    """Image count -> zero-padded kimg with three decimals: 4096 -> '000004.096'."""
    return f'{nimg // 1000:06d}.{nimg % 1000:03d}'


def snapshot_name(nimg: int) -> str:
    return f'network-snapshot-{kimg_stamp(nimg)}.pkl'


class RunFolderLock:
    """An exclusive flock on a folder, held from construction until release() (or until the process ends).

    Raises RuntimeError when another process holds it. On file systems without flock the
    lock is not held (`held` False) and nothing is refused.
    """

    def __init__(self, folder: str, blocking: bool = False):
        fd = os.open(folder, os.O_RDONLY)
        self._close = weakref.finalize(self, os.close, fd)
        self.held = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            self.held = True
        except BlockingIOError:
            self.release()
            raise RuntimeError(f'{folder}: another training process writes in this folder') from None
        except OSError:
            pass            # no flock here (some network file systems)

    def release(self):
        self._close()       # closing the folder releases the lock


def create_run_dir(outdir: str, desc: str) -> str:
    """Make outdir/NNNNN-desc, NNNNN one more than the highest run number there, and return it.

    Runs starting together take numbers one at a time (a lock on outdir), and os.makedirs
    without exist_ok means a folder is never shared even where that lock does not work.
    """
    os.makedirs(outdir, exist_ok=True)
    lock = RunFolderLock(outdir, blocking=True)
    try:
        tried = -1
        while True:
            ids = [int(m.group(1)) for m in map(_RUN_ID.match, os.listdir(outdir)) if m]
            tried = max(max(ids, default=-1), tried) + 1
            run_dir = os.path.join(outdir, f'{tried:05d}-{desc}')
            try:
                os.makedirs(run_dir)
                return run_dir
            except FileExistsError:
                continue    # taken since the listing: the next number
    finally:
        lock.release()


def remove_stale_temp_files(folder: str, lock: RunFolderLock = None) -> list:
    """Remove what interrupted atomic writes of a run left in `folder` -> [(name, bytes)].

    Only names of the files a run writes. `lock`: this process's lock on `folder`; without
    it the folder's lock is taken for the moment, and nothing is removed while a run holds it.
    """
    own = lock is None
    if own:
        try:
            lock = RunFolderLock(folder)
        except RuntimeError:
            return []
    try:
        if not lock.held:
            return []       # cannot tell a live run from a dead one here
        removed = []
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if _STALE_TEMP.match(name) and os.path.isfile(path):
                removed.append((name, os.path.getsize(path)))
                os.remove(path)
        return removed
    finally:
        if own:
            lock.release()
