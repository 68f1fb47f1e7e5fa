"""Whether the generated mouth follows the driving mesh's jaw (issue 18's expression control).

Fixed inputs, no dataset: the bundled head model (`training/mesh/head_model.py`, posed as
the synthetic dataset poses it: jaw_pose (jaw, 0, 0) radians, identity and expression 0),
seeds 0 ... num_seeds - 1 (z = RandomState(seed).randn, as gen_samples.py), truncation
psi 0.7, the frontal camera on G's orbit (`generation.frontal_label`), noise_mode 'const'.
Every render call takes the seeds in the same batches, each batch with a renderer
generator seeded with RENDER_SEED: two renders of a seed differ by the mesh only, and the
values repeat exactly. Images are G's `image` in [-1, 1]; a change is the mean over RGB of
|image_a - image_b| per pixel; boxes are in pixels of the output image.

mouth     mean over the seeds of the mean change over the mouth box between the head
          model with jaw JAW rad and with jaw 0. Mouth box: the square centred on the
          bounding box of the lip landmarks 48-67 of both meshes projected with the frontal
          camera, side BOX_SCALE x the bounding box's larger side, rounded to pixels.
forehead  the same over the forehead box: as large as the mouth box, centred on the
          projection of the point FOREHEAD_RISE above the midpoint of brow landmarks 19 and
          24 (jaw-0 mesh). Nothing there depends on the jaw.
ratio     mouth / max(forehead, RATIO_FLOOR): a still forehead gives a finite ratio.
lip_corr  over the frames of data/driving (their meshes and landmarks, seen by the same
          frontal camera): per frame the mean over the seeds of the mean change over the
          driving mouth box (as above, from the lip landmarks of all frames) between that
          frame and the most closed frame; the Pearson correlation of this change with the
          frames' inner-lip opening, the distance of landmarks 62 and 66 (0 when either is
          constant). 1 = the mouth moves as much as the mesh's lips open.

Issue 18's target: mouth >= 0.2 and ratio >= 10. Every rank computes all of it (~300 images).
"""

import copy
import os

import numpy as np
import torch

from metrics import expression_pose_accuracy
from metrics import mesh_surface
from metrics import metric_utils
from training import driving
from training import generation
from training.mesh.head_model import load_head_model

JAW = 0.3                                   # radians
BOX_SCALE = 1.2
FOREHEAD_RISE = (0.0, 0.035, 0.0)           # mesh metres (y up)
RATIO_FLOOR = 1e-4
TRUNCATION_PSI = 0.7
RENDER_SEED = 0
LIPS = slice(48, 68)
BROWS = (19, 24)


def square_box(points: np.ndarray, side: float, resolution: int):
    """The square of `side` pixels centred on the bounding box of `points` (K, 2), rounded to pixels
    -> (row slice, column slice), clipped to the image."""
    centre = (points.min(0) + points.max(0)) / 2
    size = int(round(side))
    x0, y0 = (int(round(float(x) - side / 2)) for x in centre)
    if size < 1 or x0 >= resolution or y0 >= resolution or x0 + size <= 0 or y0 + size <= 0:
        raise ValueError(f'jaw_control: a {size} px box at ({x0}, {y0}) is not inside the {resolution} px image')
    return slice(max(y0, 0), min(y0 + size, resolution)), slice(max(x0, 0), min(x0 + size, resolution))


def lip_box(lms: torch.Tensor, label: torch.Tensor, resolution: int):
    """Mouth box (rows, columns) and its side (pixels) of the lip landmarks of all of lms (M, 68, 3), seen by label (1, 25)."""
    px = expression_pose_accuracy.project(lms[:, LIPS], label.cpu().expand(len(lms), -1), resolution).reshape(-1, 2)
    side = BOX_SCALE * float((px.max(0) - px.min(0)).max())
    return square_box(px, side, resolution), side


def head_conditions(head) -> torch.Tensor:
    """The head model with jaw 0 and JAW: conditions (2, V + 68, 3)."""
    with torch.no_grad():
        verts, lms = head(jaw_pose=torch.tensor([[0.0, 0.0, 0.0], [JAW, 0.0, 0.0]]))
    return torch.cat([verts, lms], dim=1)


def jaw_boxes(head, label: torch.Tensor, resolution: int):
    """The mouth and forehead boxes (row slice, column slice) of the head model's jaw 0 / JAW meshes."""
    lms = head_conditions(head)[:, -68:]
    mouth_box, side = lip_box(lms, label, resolution)
    brow = (lms[0, BROWS[0]] + lms[0, BROWS[1]]) / 2 + torch.tensor(FOREHEAD_RISE)
    forehead = expression_pose_accuracy.project(brow[None, None], label.cpu(), resolution)[0]
    return mouth_box, square_box(forehead, side, resolution)


class SeededRenderer:
    """Renders of the fixed seeds for any mesh condition, with the same random numbers every call."""

    def __init__(self, G, num_seeds: int, batch_size: int, device):
        self.G, self.batch_size, self.device = G, batch_size, device
        z = [np.random.RandomState(seed).randn(1, G.z_dim) for seed in range(num_seeds)]
        self.z = torch.from_numpy(np.concatenate(z)).float().to(device)
        self.label = generation.frontal_label(G, device=device)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """Condition (1, V + 68, 3) -> images (num_seeds, C, R, R)."""
        images = []
        for start in range(0, len(self.z), self.batch_size):
            z = self.z[start:start + self.batch_size]
            generator = torch.Generator(device=self.device).manual_seed(RENDER_SEED)
            out = self.G(z, self.label.expand(len(z), -1), v.expand(len(z), -1, -1), truncation_psi=TRUNCATION_PSI,
                         noise_mode='const', generator=generator)
            images.append(out['image'])
        return torch.cat(images)


def box_change(a: torch.Tensor, b: torch.Tensor, box) -> float:
    """Mean over images, box pixels and channels of |a - b|, images (N, C, R, R)."""
    return float((a - b).abs().mean(1)[:, box[0], box[1]].double().mean())


def check_generator(G, name: str, num_vertices: int = None):
    """Raise ValueError naming `name` unless G is driven by the bundled head model's mesh (its
    vertex count `num_vertices`, read from the model when not given)."""
    num_vertices = num_vertices or load_head_model().v_template.shape[0]
    if getattr(G, 'num_vertices', None) != num_vertices:
        raise ValueError(f'{name} needs a generator driven by the bundled head model\'s mesh ({num_vertices} vertices); '
                         f'this one takes {getattr(G, "num_vertices", None) or "no mesh"}')


@torch.no_grad()
def compute_jaw_control(opts: metric_utils.MetricOptions, name: str, num_seeds: int = 8, driving_dir: str = generation.BUNDLED_DRIVING,
                        num_frames: int = None) -> dict:
    """{name}_mouth, {name}_forehead, {name}_ratio, {name}_lip_corr (see the module docstring).
    num_frames: the first frames of the driving folder only (tests)."""
    G = copy.deepcopy(opts.G).eval().requires_grad_(False).to(opts.device)
    head = load_head_model()
    num_vertices = head.v_template.shape[0]
    check_generator(G, name, num_vertices)
    render = SeededRenderer(G, num_seeds, opts.batch_size, opts.device)
    resolution = G.img_resolution

    mouth_box, forehead_box = jaw_boxes(head, render.label, resolution)
    closed, opened = (render(v[None].to(opts.device)) for v in head_conditions(head))
    mouth, forehead = box_change(opened, closed, mouth_box), box_change(opened, closed, forehead_box)

    frames = driving.read_driving_folder(driving_dir)[:num_frames]
    conditions = [driving.load_condition(f.obj_path, f.lms_path, num_vertices=num_vertices).to(opts.device) for f in frames]
    lms = torch.cat(conditions)[:, -68:].cpu()
    opening = driving.lip_opening(lms)
    box, _ = lip_box(lms, render.label, resolution)
    most_closed = int(opening.argmin())
    closest = render(conditions[most_closed])
    # Streamed (512 px images are large); the most closed frame's change is 0 (same mesh, same random numbers).
    change = torch.tensor([0.0 if i == most_closed else box_change(render(v), closest, box) for i, v in enumerate(conditions)])
    return {f'{name}_mouth': mouth, f'{name}_forehead': forehead, f'{name}_ratio': mouth / max(forehead, RATIO_FLOOR),
            f'{name}_lip_corr': float(mesh_surface.correlation(change, opening))}
