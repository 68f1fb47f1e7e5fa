"""Turn a training snapshot into a bundled model file: the networks without the resume state.

    python pretrained_models/bundle_snapshot.py training-runs/00006-.../network-snapshot-000149.224.pkl \\
        pretrained_models/next3d-synthetic64.pkl --data datasets/synthetic64exp.zip --force

Keeps G, D, G_ema (and ADA's augment pipe, if the snapshot has one) exactly; drops
`resume_state` (optimizer moments, counters: what only `train.py --resume` reads, half the
file), so `--resume` from the bundled file starts a new run from its weights. `--data`
replaces the dataset path recorded in the snapshot (a path of the machine it was trained
on) with the one its README documents. The output is written atomically; an existing file
is replaced only with `--force`.
"""

import os
import sys
from typing import Optional

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run as a script from anywhere

from dnnlib import cli                          # noqa: E402
from torch_utils import persistence             # noqa: E402

KEPT = ('G', 'D', 'G_ema', 'augment_pipe', 'training_set_kwargs')


def bundle(snapshot: str, out: str, data_path: Optional[str] = None) -> dict:
    """Read `snapshot`, write its networks without the resume state to `out` -> what was written."""
    data = persistence.load_checkpoint(snapshot)
    missing = [key for key in ('G', 'D', 'G_ema') if key not in data]
    if missing:
        raise persistence.CheckpointError(f'{snapshot}: not a training snapshot (no {", ".join(missing)})')
    bundled = {key: data[key] for key in KEPT if key in data}
    if data_path is not None:
        bundled['training_set_kwargs'] = dict(bundled.get('training_set_kwargs') or {}, path=data_path)
    persistence.save_checkpoint(out, bundled)
    return bundled


@click.command()
@click.argument('snapshot', type=click.Path(dir_okay=False))
@click.argument('out', type=click.Path(dir_okay=False))
@click.option('--data', 'data_path', metavar='PATH', help='Dataset path to record in place of the snapshot\'s')
@click.option('--force', is_flag=True, help='Replace OUT if it exists')
@cli.user_errors
def main(snapshot: str, out: str, data_path: str, force: bool):
    """Write SNAPSHOT's networks, without its resume state, to OUT."""
    if os.path.exists(out) and os.path.exists(snapshot) and os.path.samefile(out, snapshot):
        raise click.ClickException(f'{out}: is the snapshot itself (its resume state would be lost): choose another output')
    if os.path.exists(out) and not force:
        raise click.ClickException(f'{out}: exists (pass --force to replace it)')
    bundled = bundle(snapshot, out, data_path)
    size = os.path.getsize(out) / 2 ** 20
    print(f'{out}: {", ".join(sorted(bundled))} from {snapshot} ({size:.1f} MiB)')


if __name__ == '__main__':
    main()
