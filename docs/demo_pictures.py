"""The README's demo pictures, cut from what `make demo` wrote.

    make demo && python docs/demo_pictures.py out

docs/demo_seeds.png          the four seeds' three views (samples/seed000N.png), one row each
docs/demo_depth.png          samples/depth.png
docs/demo_orbit_frame.png    the orbit video's first frame
docs/demo_reenact_frame.png  two frames of the reenactment video, one above the other: where
                             the driving mouth is most closed and where it is widest open
                             (inner-lip landmarks 62 and 66 of data/driving)
"""

import os
import sys

import click
import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run as a script from anywhere

from dnnlib import cli                          # noqa: E402
from torch_utils import persistence             # noqa: E402
from training.driving import lip_opening, read_driving_folder   # noqa: E402
from training.generation import BUNDLED_DRIVING   # noqa: E402
from training.mesh.obj_io import read_landmarks  # noqa: E402
from training.video import read_video_frames    # noqa: E402

DOCS = os.path.dirname(os.path.abspath(__file__))
SEEDS = range(4)


def lip_openings(driving_root: str) -> np.ndarray:
    """The mouth's opening per driving frame (inner-lip landmarks 62 and 66, mesh units), in file order."""
    lms = np.stack([read_landmarks(frame.lms_path) for frame in read_driving_folder(driving_root)])
    return lip_opening(torch.from_numpy(lms)).numpy()


def read_image(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: missing (run make demo first)')
    return np.asarray(PIL.Image.open(path).convert('RGB'))


def read_frames(path: str) -> list:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: missing (run make demo first)')
    frames = read_video_frames(path)
    if not frames:
        raise ValueError(f'{path}: the video has no frames')
    return frames


def save(image: np.ndarray, dest: str, name: str):
    path = os.path.join(dest, name)
    with persistence.atomic_output(path, suffix='.png') as tmp:
        PIL.Image.fromarray(image).save(tmp)
    print(f'{path}: {image.shape[1]}x{image.shape[0]}')


@click.command()
@click.argument('demo_out', type=click.Path(file_okay=False))
@click.option('--dest', type=click.Path(file_okay=False), default=DOCS, show_default='docs/', help='Folder to write the pictures into')
@cli.user_errors
def main(demo_out: str, dest: str):
    """Write the README's four demo pictures from DEMO_OUT (make demo's folder)."""
    seeds = [read_image(os.path.join(demo_out, 'samples', f'seed{seed:04d}.png')) for seed in SEEDS]
    depth = read_image(os.path.join(demo_out, 'samples', 'depth.png'))
    orbit = read_frames(os.path.join(demo_out, 'orbit', 'interpolation.mp4'))
    reenact = read_frames(os.path.join(demo_out, 'reenact', 'reenact.mp4'))
    openings = lip_openings(BUNDLED_DRIVING)
    if len(reenact) != len(openings):
        raise ValueError(f'{os.path.join(demo_out, "reenact", "reenact.mp4")}: {len(reenact)} frames, but the driving folder has {len(openings)}')
    save(np.concatenate(seeds, axis=0), dest, 'demo_seeds.png')
    save(depth, dest, 'demo_depth.png')
    save(orbit[0], dest, 'demo_orbit_frame.png')
    save(np.concatenate([reenact[int(openings.argmin())], reenact[int(openings.argmax())]], axis=0), dest, 'demo_reenact_frame.png')


if __name__ == '__main__':
    main()
