"""Shared pieces of the training tests: a tiny valid dataset and tiny real networks.

The dataset is written in SPEC section 8's layout with random images, cameras on EG3D's
orbit, a small symmetric 'mesh' (a ring of vertices, mirror-symmetric in x) with random
per-item jitter, and 68 landmarks. The networks are the project's EG3DGenerator and
DualDiscriminator at toy sizes (they run a training step in about a second on a CPU).
"""

import json
import math
import os

import numpy as np
import PIL.Image
import torch

from training import coords
from training.mesh import obj_io

NUM_VERTICES = 12


def symmetric_vertices(rnd: np.random.RandomState) -> np.ndarray:
    """(12, 3) metres: 6 points with x > 0 and their mirror images (index i + 6 mirrors i)."""
    half = rnd.uniform([0.02, -0.1, -0.05], [0.1, 0.1, 0.05], size=(NUM_VERTICES // 2, 3)).astype(np.float32)
    return np.concatenate([half, half * np.array([-1, 1, 1], dtype=np.float32)])


def make_dataset(root: str, count: int = 8, resolution: int = 32, seed: int = 0, exp_dim: int = 0, num_vertices: int = NUM_VERTICES) -> str:
    """Write a dataset under `root` (root layout); returns root."""
    rnd = np.random.RandomState(seed)
    res = f'{resolution}x{resolution}'
    base = symmetric_vertices(np.random.RandomState(1234))
    labels, exps = [], []
    for i in range(count):
        rel = f'{i // 1000:05d}/img{i:08d}'
        img = rnd.randint(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
        os.makedirs(os.path.join(root, f'images{res}', os.path.dirname(rel)), exist_ok=True)
        PIL.Image.fromarray(img).save(os.path.join(root, f'images{res}', rel + '.png'))
        yaw = math.pi / 2 + rnd.uniform(-0.4, 0.4)
        pitch = math.pi / 2 + rnd.uniform(-0.2, 0.2)
        label = coords.make_label(coords.cam2world_look_at(torch.tensor([yaw]), torch.tensor([pitch])))[0]
        labels.append([rel + '.png', label.tolist()])
        exps.append([rel + '.png', rnd.randn(exp_dim).tolist()])
        verts = base[:num_vertices] + rnd.normal(0, 0.002, size=(num_vertices, 3)).astype(np.float32)
        os.makedirs(os.path.join(root, f'meshes{res}', os.path.dirname(rel)), exist_ok=True)
        obj_io.write_obj(os.path.join(root, f'meshes{res}', rel + '.obj'), verts)
        os.makedirs(os.path.join(root, f'lms{res}', os.path.dirname(rel)), exist_ok=True)
        obj_io.write_landmarks(os.path.join(root, f'lms{res}', rel + '.txt'), rnd.normal(0, 0.05, size=(68, 3)))
    with open(os.path.join(root, f'images{res}', 'dataset.json'), 'w') as f:
        json.dump({'labels': labels}, f)
    if exp_dim:
        with open(os.path.join(root, f'images{res}', 'dataset_exp.json'), 'w') as f:
            json.dump({'labels': exps}, f)
    return root


def tiny_G_kwargs(resolution: int = 32) -> dict:
    """EG3DGenerator at toy size: 16-d latents, 16x16 planes, 16x16 raw renders, 6 + 6 samples per ray."""
    return dict(class_name='training.eg3d_generator.EG3DGenerator', z_dim=16, w_dim=16, img_resolution=resolution,
                plane_resolution=16, plane_channels=8, neural_rendering_resolution=16,
                mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=256, channel_max=16, num_fp16_res=0),
                sr_kwargs=dict(block_channels=[16, 16], num_fp16_res=0),
                rendering_kwargs=dict(depth_resolution=6, depth_resolution_importance=6))


def tiny_D_kwargs(resolution: int = 32, c_dim: int = 25) -> dict:
    return dict(class_name='training.dual_discriminator.DualDiscriminator', c_dim=c_dim, img_resolution=resolution,
                channel_base=256, channel_max=16, num_fp16_res=0, mapping_layers=2)
