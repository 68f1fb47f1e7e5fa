"""Accuracy and speed of the in-the-wild fit on synthetic ground truth.

    python benchmarks/preprocess_fit_accuracy.py --count 20

Renders nothing: draws heads of the bundled model with random shape, expression and jaw
(like the synthetic generator: yaw sd 0.3, pitch sd 0.15 rad, our orbit camera), projects
their 68 landmarks into a 512 image with the true camera, then runs the preprocessing's
steps 2-4 (EG3D crop from five points, pose, head-model fit) on those points. Prints the
pose error (yaw, pitch, roll of the label's rotation vs the true camera's), the landmark
reprojection error in the 512 crop, the jaw error and the fit time per image.
"""

import math
import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset_preprocessing import alignment, fit_flame, pose_label      # noqa: E402
from training import coords                                             # noqa: E402
from training.mesh.head_model import load_head_model                    # noqa: E402
from training.mesh.rasterize import project_perspective                 # noqa: E402


@click.command()
@click.option('--count', type=int, default=20, show_default=True, help='Synthetic heads to fit')
@click.option('--seed', type=int, default=0, show_default=True, help='Random seed of the heads')
@click.option('--threads', type=int, default=1, show_default=True, help='torch CPU threads')
def main(count, seed, threads):
    torch.set_num_threads(threads)
    model = fit_flame.HeadModelAdapter(load_head_model())
    g = torch.Generator().manual_seed(seed)
    pose_err, reproj, jaw_err, times = [], [], [], []
    for _ in range(count):
        shape, exp = torch.randn(1, model.n_shape, generator=g), 0.5 * torch.randn(1, model.n_exp, generator=g)
        jaw = 0.25 * torch.rand(1, generator=g)
        yaw, pitch = 0.3 * torch.randn(1, generator=g), 0.15 * torch.randn(1, generator=g)
        lms = model(shape, exp, torch.stack([jaw, torch.zeros(1), torch.zeros(1)], 1))[1]
        cam = coords.cam2world_look_at(math.pi / 2 + yaw, math.pi / 2 + pitch)
        points = (project_perspective(coords.mesh_to_world(lms), coords.make_label(cam))[0, :, :2].numpy() + 1) * 256
        start = time.time()
        box, _, _ = alignment.align_face(alignment.landmarks_68_to_5(points))
        result = fit_flame.fit_head(model, box.to_crop(points)[None], 512)
        times.append(time.time() - start)
        est = pose_label.cam2world_to_head_angles(result.labels[0, :16].reshape(4, 4))
        pose_err.append(np.degrees(np.abs(est - pose_label.cam2world_to_head_angles(cam[0].numpy()))))
        reproj.append(result.error_px[0])
        jaw_err.append(abs(float(result.jaw_pose[0, 0] - jaw)))
    pose_err = np.array(pose_err)
    print(f'{count} heads, yaw sd 0.3 rad, pitch sd 0.15 rad, jaw 0-0.25 rad')
    for i, name in [(1, 'yaw'), (0, 'pitch'), (2, 'roll')]:
        print(f'{name:5s} error deg: mean {pose_err[:, i].mean():.3f}  max {pose_err[:, i].max():.3f}')
    print(f'landmark reprojection px at 512: mean {np.mean(reproj):.3f}  max {np.max(reproj):.3f}')
    print(f'jaw opening error rad: mean {np.mean(jaw_err):.4f}  max {np.max(jaw_err):.4f}')
    print(f'fit time per image s: median {np.median(times):.2f}  max {np.max(times):.2f} ({threads} thread(s))')


if __name__ == '__main__':
    main()
