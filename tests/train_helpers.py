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


def make_dataset(root: str, count: int = 8, resolution: int = 32, seed: int = 0, exp_dim: int = 0, template: str = None) -> str:
    """Write a dataset under `root` (root layout); returns root.

    Meshes: the 12-vertex symmetric toy mesh, or `template`'s vertices (e.g. the bundled
    head model), with 2 mm of random jitter per item.
    """
    rnd = np.random.RandomState(seed)
    res = f'{resolution}x{resolution}'
    base = symmetric_vertices(np.random.RandomState(1234)) if template is None else obj_io.read_obj_vertices(template)
    num_vertices = len(base)
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
        verts = base + rnd.normal(0, 0.002, size=(num_vertices, 3)).astype(np.float32)
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


def loop_kwargs(run_dir: str, data: str, **overrides) -> dict:
    """training_loop arguments for the toy networks: batch 2, lazy regularization every 2 steps, no metrics."""
    kwargs = dict(
        run_dir=run_dir,
        training_set_kwargs=dict(class_name='training.dataset.MeshImageDataset', path=data, xflip=False),
        data_loader_kwargs=dict(num_workers=0),
        G_kwargs=tiny_G_kwargs(), D_kwargs=tiny_D_kwargs(),
        G_opt_kwargs=dict(class_name='torch.optim.Adam', lr=0.0025, betas=[0, 0.99], eps=1e-8),
        D_opt_kwargs=dict(class_name='torch.optim.Adam', lr=0.002, betas=[0, 0.99], eps=1e-8),
        loss_kwargs=dict(r1_gamma=1.0, blur_init_sigma=10, blur_fade_kimg=0.1, gpc_reg_prob=0.5, gpc_reg_fade_kimg=0.1,
                         neural_rendering_resolution_initial=16, style_mixing_prob=0.5, density_reg=0.25),
        metrics=[], random_seed=0, num_gpus=1, rank=0, device='cpu', batch_size=2, batch_gpu=2,
        ema_kimg=0.01, ema_rampup=0.05, G_reg_interval=2, D_reg_interval=2,
        total_kimg=0.004, kimg_per_tick=0.002, image_snapshot_ticks=1, network_snapshot_ticks=1, grid_size=(1, 1),
    )
    kwargs.update(overrides)
    return kwargs


def run_rank(rank: int, world_size: int, init_file: str, kwargs: dict, out_dir: str):
    """One process of a CPU data-parallel run (gloo): train, then save the final parameters and the real items drawn."""
    import os
    from training import distributed, training_loop
    consumed = []
    original_iter = training_loop.SkipSampler.__iter__

    def recording_iter(self):      # records what each loader's sampler hands out (the real stream is created first)
        log = []
        consumed.append(log)
        for idx in original_iter(self):
            log.append(idx)
            yield idx
    training_loop.SkipSampler.__iter__ = recording_iter
    torch.set_num_threads(1)         # two processes on a small CPU
    distributed.init(rank, world_size, torch.device('cpu'), 'file://' + init_file)
    try:
        result = training_loop.training_loop(**dict(kwargs, rank=rank, num_gpus=world_size))
    finally:
        distributed.shutdown()
    params = {f'{name}.{k}': v.detach().clone() for name in ('G', 'D', 'G_ema') for k, v in result[name].state_dict().items()}
    torch.save(dict(real_indices=consumed[0], params=params), os.path.join(out_dir, f'rank{rank}.pt'))
