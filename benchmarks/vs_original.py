"""Side-by-side speed of this project and the original Next3D / EG3D code, on the CPU or a GPU.

    python benchmarks/vs_original.py --original-src DIR [--eg3d-src DIR] [--pairs 5] [--device cuda]

DIR is a checkout of MrTornado24/Next3D (and of NVlabs/eg3d for the EG3D rows) that you
fetched yourself; nothing of it is part of this repository. Both sides run in their own
worker process (the two code bases share package names), one thread each, float32, with
identical constructor arguments: this project's `small128` preset (output 128, raw 64,
24 + 24 samples per ray) and EG3D with the same sizes. The original hard-codes FFHQ sizes
(256 tri-planes and textures, a 64 mouth crop, 512-wide super-resolution latents, 5023
FLAME vertices); the worker copies its sources to a temporary folder and replaces exactly
those literals (each replacement must match the expected number of times, so a changed
original stops the script). One more edit lets the original train at all at these sizes:
with the raw resolution equal to the 2X super-resolution's input (64), its `image_raw` is a
view of the feature image that the first SR block adds into in place, and autograd refuses
the backward ("modified by an inplace operation"); the benchmark makes it a copy (4 x 3 x
64 x 64 floats), which changes no value. Everything else is the original code as published, with
these substitutions so that it imports and runs on a CPU without pytorch3d or OpenCV:

  pytorch3d           `Meshes` / `rasterize_meshes` route to this project's rasterizer
                      (training/mesh/rasterize.py, called as our texture planes call it),
                      `load_obj` to its OBJ reader: only networks, renderer and loss are
                      compared, not two rasterizers;
  cv2                 `imread` (PIL) and the mouth's `floodFill` (scipy.ndimage.label,
                      4-connected, fixed range from the seed, as OpenCV's flags ask);
  turtle, requests, pydantic, matplotlib.image, torchvision.utils: empty stubs (imported,
                      never called); distutils.util and imp likewise, where this Python
                      no longer has them;
  custom ops          on the CPU: bias_act / upfirdn2d / filtered_lrelu on their reference
                      paths (as on any CPU), conv2d_gradfix disabled. On a GPU the original
                      builds and uses its own CUDA plugins (bias_act, upfirdn2d) and its
                      conv2d_gradfix, as its training loop does; a plugin that fails to build
                      falls back to its reference and the result says so. Its plugin loader
                      gets one edit: it looks the built module up in sys.modules, where
                      PyTorch 2's cpp_extension.load no longer puts it ("No module named
                      'bias_act_plugin'"); it uses the module that load returns instead.

On a GPU (`--device cuda`) both sides run as their training loops set the device up: cuDNN
benchmark mode on, TF32 off for matmuls and convolutions (full float32); ours uses its own
CUDA kernels. Times are wall clock with the device synchronised around every phase; the
peak memory is the GPU memory allocated by PyTorch; the profiles rank ops by their time on
the GPU.

Host memory: our side keeps freed tensors in malloc's heap (torch_utils/host_memory.py), as
our training loop and scripts do; the original runs with glibc's defaults unless
`--original-allocator=ours` gives it the same policy, which compares the code alone.

Measured, per preset, after one untimed warm-up each:
  train   one training step = Gmain + Greg / 4 + Dmain + Dreg / 16 (each phase run once and
          weighted by its interval, as benchmarks/train_step.py), batch `--batch`, Adam,
          each side's own loss (training/loss.py; the original's StyleGAN2Loss) and
          optimizer step (the original's NaN cleaning of the gradients included);
  infer   G forward in eval mode under no_grad (noise 'const'), batch `--batch`.
The two workers take turns, A B B A ..., one call at a time (never both at once), and every
pair gives a ratio; the table shows the median of the ratios over `--pairs` pairs, of wall
time and of process CPU time (with one thread, CPU time is the work done; it is less
disturbed than wall time by other load on a shared machine). Then each side runs one
training step (all four phases once) under torch.profiler: top 10 ops by self CPU time;
and reports its peak resident memory. Last, on the CPU, each side runs the four phases and one
inference once more with the time inside its convolutions recorded (forward and backward,
oneDNN on both sides, ours channels last), which bounds the speed-up: our convolutions alone against
the original's whole step (not with --compile); and three inferences with timers around the
stages of G (INFERENCE_STAGES: mapping, each network, the rasterization, the renderer, the
super-resolution), which shows where each side spends an inference.

`--compile all --compile-backend cudagraphs`: our D, G's synthesis and its density query traced
by dynamo and replayed as CUDA graphs with eager kernels (torch_utils/compiled.py): what it cuts on a GPU is
the host's work per launch, which bounds our small-batch step there.

`--geometry-in-loader`: our Next3D training phases are given their meshes' geometry made
beforehand and not timed (training_loop.GeometryCollate makes it in the data loader's
workers under train.py --geometry-in-loader), i.e. our training step without its
rasterization, as our training loop then runs it; the original still rasterizes in its
step, and inference on both sides. Our side then runs on more than one core in training:
the table says so.

The result goes to benchmarks/results/vs_original-<cpu|cuda>-<date>-<HHMM>.md (UTC; command,
commit, device, load before and after).
"""

import datetime
import importlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import types

import click
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_MODEL = os.path.join(ROOT, 'data', 'head_model')
# torch_utils/compiled.BACKENDS, default first (this process does not import the project's torch code).
COMPILE_BACKENDS = ('inductor', 'aot_eager', 'cudagraphs')
CUR_NIMG = 10 ** 7          # after every fade: no blur, swap probability gpc_reg_prob
FLOODFILL_FIXED_RANGE = 1 << 16     # OpenCV's flag value
# A file each checkout must have (relative to its root).
CHECKOUT_MARKERS = {'next3d': 'training_avatar_texture/triplane_next3d.py', 'eg3d': 'eg3d/training/triplane.py'}
PHASES = (('Gmain', 1), ('Greg', 4), ('Dmain', 1), ('Dreg', 16))
# The stages of one inference, timed by `stage_seconds`: (label, the module under G on our
# side, on the original's). A name ending in '()' is a method of G, timed by wrapping it: the
# original's rasterize() draws the four views and looks the texture up, what our texture
# planes' forward does. The renderer includes its decoder on both sides.
INFERENCE_STAGES = {
    'next3d': (('mapping', 'backbone.mapping', 'backbone.mapping'),
               ('texture (StyleGAN2)', 'texture_backbone.synthesis', 'texture_backbone.synthesis'),
               ('mesh rasterization and texture lookups', 'rasterizer', 'rasterize()'),
               ('mouth (StyleUNet)', 'mouth_backbone', 'mouth_backbone.synthesis'),
               ('neural blending (StyleUNet)', 'neural_blending', 'neural_blending.synthesis'),
               ('tri-plane backbone (StyleGAN2)', 'backbone.synthesis', 'backbone.synthesis'),
               ('renderer: plane sampling, decoder, ray marching', 'renderer', 'renderer'),
               ('super-resolution', 'superresolution', 'superresolution')),
    'eg3d': (('mapping', 'backbone.mapping', 'backbone.mapping'),
             ('tri-plane backbone (StyleGAN2)', 'backbone.synthesis', 'backbone.synthesis'),
             ('renderer: plane sampling, decoder, ray marching', 'renderer', 'renderer'),
             ('super-resolution', 'superresolution', 'superresolution')),
}
STAGE_CALLS = 3             # inferences timed by stage (their median per stage)
ADAM = dict(lr=0.0025, betas=(0.0, 0.99), eps=1e-8)
ADAM_D = dict(lr=0.002, betas=(0.0, 0.99), eps=1e-8)


# ---------------------------------------------------------------------------------------
# Configuration (parent process: this project's presets are the single source of sizes)

def make_config(preset: str, batch: int, original_src: str) -> dict:
    """Constructor arguments of both sides, from this project's small128 preset."""
    sys.path.insert(0, ROOT)
    from training import configs
    g = configs.generator_kwargs('small128')
    d = {k: v for k, v in configs.PRESETS['small128']['D'].items()}
    syn, rk = g['synthesis_kwargs'], g['rendering_kwargs']
    sizes = dict(plane=g['plane_resolution'], texture=g['texture_resolution'], channels=g['plane_channels'],
                 mouth_in=g['mouth_kwargs']['in_resolution'], mouth_bottleneck=g['mouth_kwargs']['bottleneck_resolution'],
                 blend_bottleneck=g['blending_kwargs']['bottleneck_resolution'], sr_channels=list(g['sr_kwargs']['block_channels']),
                 w_dim=g['w_dim'], num_vertices=g['num_vertices'], img=g['img_resolution'], raw=g['neural_rendering_resolution'])
    if preset == 'eg3d':
        ours_g = {k: v for k, v in g.items() if k not in ('num_vertices', 'num_faces', 'num_uvs', 'texture_resolution',
                                                             'mouth_kwargs', 'blending_kwargs')}
        ours = dict(G_cfg='tiny64-eg3d', G=ours_g)         # the EG3D class with small128's sizes
    else:
        ours = dict(G_cfg='small128', G={})
    official_rk = {
        'image_resolution': g['img_resolution'], 'disparity_space_sampling': False, 'clamp_mode': 'softplus',
        'superresolution_module': ('training_avatar_texture' if preset == 'next3d' else 'training') + '.superresolution.SuperresolutionHybrid2X',
        'c_gen_conditioning_zero': False, 'gpc_reg_prob': 0.5, 'c_scale': 1.0, 'superresolution_noise_mode': 'none',
        'density_reg': 0.25, 'density_reg_p_dist': 0.004, 'reg_type': 'l1', 'decoder_lr_mul': 1.0, 'sr_antialias': True,
        'depth_resolution': rk['depth_resolution'], 'depth_resolution_importance': rk['depth_resolution_importance'],
        'ray_start': 2.25, 'ray_end': 3.3, 'box_warp': 1, 'avg_camera_radius': 2.7, 'avg_camera_pivot': [0, 0, 0.2],
    }
    if preset == 'next3d':
        official_rk['gen_exp_cond'] = False
    official_g = dict(
        class_name=('training_avatar_texture.triplane_next3d' if preset == 'next3d' else 'training.triplane') + '.TriPlaneGenerator',
        z_dim=g['z_dim'], w_dim=g['w_dim'], mapping_kwargs=dict(num_layers=g['mapping_kwargs']['num_layers']),
        channel_base=syn['channel_base'], channel_max=syn['channel_max'], num_fp16_res=syn['num_fp16_res'],
        conv_clamp=syn['conv_clamp'], fused_modconv_default='inference_only', rendering_kwargs=official_rk,
        sr_num_fp16_res=0, sr_kwargs=dict(channel_base=syn['channel_base'], channel_max=syn['channel_max'],
                                          fused_modconv_default='inference_only'))
    if preset == 'next3d':
        official_g['topology_path'] = os.path.join(HEAD_MODEL, 'head_template.obj')
    official_d = dict(
        class_name=('training_avatar_texture' if preset == 'next3d' else 'training') + '.dual_discriminator.DualDiscriminator',
        channel_base=d['channel_base'], channel_max=d['channel_max'], num_fp16_res=d['num_fp16_res'], conv_clamp=d['conv_clamp'],
        disc_c_noise=0, block_kwargs=dict(freeze_layers=0), mapping_kwargs={}, epilogue_kwargs=dict(mbstd_group_size=4))
    official = dict(src=original_src, G=official_g, D=official_d, sizes=sizes)
    return dict(preset=preset, batch=batch, img_resolution=g['img_resolution'], raw=g['neural_rendering_resolution'],
                r1_gamma=1.0, gpc_reg_prob=0.5, ours=ours, official=official)


def make_inputs(path: str, batch: int, img_resolution: int):
    """Random reals in [-1, 1], cameras on EG3D's orbit, the bundled head mesh + landmarks per sample."""
    sys.path.insert(0, ROOT)
    import torch
    from training import coords
    from training.mesh import obj_io
    rnd = np.random.RandomState(0)
    yaw = torch.from_numpy(np.pi / 2 + rnd.uniform(-0.4, 0.4, batch)).float()
    pitch = torch.from_numpy(np.pi / 2 + rnd.uniform(-0.2, 0.2, batch)).float()
    c = coords.make_label(coords.cam2world_look_at(yaw, pitch)).numpy()
    real = (rnd.uniform(size=(batch, 3, img_resolution, img_resolution)) * 2 - 1).astype(np.float32)
    verts = obj_io.read_obj_vertices(os.path.join(HEAD_MODEL, 'neutral.obj'))
    lms = obj_io.read_landmarks(os.path.join(HEAD_MODEL, 'neutral_lms.txt'))
    v = np.repeat(np.concatenate([verts, lms])[None].astype(np.float32), batch, axis=0)
    np.savez(path, real=real, c=c.astype(np.float32), v=v)


# ---------------------------------------------------------------------------------------
# The original code on the CPU (worker process)

def official_patches(preset: str, s: dict) -> dict:
    """{relative file: [(old, new, expected count)]}: the original's FFHQ literals -> our sizes."""
    ch0, ch1 = s['sr_channels']
    sr = [('SynthesisBlockNoUp(channels, 128, w_dim=512, resolution=64,', f'SynthesisBlockNoUp(channels, {ch0}, w_dim={s["w_dim"]}, resolution=64,', 1),
          ('SynthesisBlock(128, 64, w_dim=512, resolution=128,', f'SynthesisBlock({ch0}, {ch1}, w_dim={s["w_dim"]}, resolution=128,', 1)]
    # At raw 64 = the 2X module's input resolution, the original's rgb is a view of the feature
    # image that super-resolution's first block then adds into in place (img.add_): autograd
    # refuses the backward. A copy keeps every value as the original computes it.
    raw_copy = ('rgb_image = feature_image[:, :3]', 'rgb_image = feature_image[:, :3].clone()', 1)
    # PyTorch 2's cpp_extension.load returns the built module without putting it in
    # sys.modules, where the original's plugin loader looks it up: use what load returns.
    plugins = {'torch_utils/custom_ops.py': [
        ('            torch.utils.cpp_extension.load(name=module_name, build_directory=cached_build_dir,',
         '            module = torch.utils.cpp_extension.load(name=module_name, build_directory=cached_build_dir,', 1),
        ('            torch.utils.cpp_extension.load(name=module_name, verbose=verbose_build, sources=sources, **build_kwargs)',
         '            module = torch.utils.cpp_extension.load(name=module_name, verbose=verbose_build, sources=sources, **build_kwargs)', 1),
        ('        module = importlib.import_module(module_name)\n', '', 1)]}
    if preset == 'eg3d':
        return {**plugins, 'training/superresolution.py': sr, 'training/triplane.py': [
            ('img_resolution=256, img_channels=32*3,', f'img_resolution={s["plane"]}, img_channels=32*3,', 1), raw_copy]}
    p, t, half = s['plane'], s['texture'], s['plane'] // 2
    return {**plugins, 'training_avatar_texture/superresolution.py': sr, 'training_avatar_texture/triplane_next3d.py': [
        ('StyleGAN2Backbone(z_dim, c_dim, w_dim, img_resolution=256, img_channels=32, mapping_kwargs',
         f'StyleGAN2Backbone(z_dim, c_dim, w_dim, img_resolution={t}, img_channels=32, mapping_kwargs', 1),
        ('img_resolution=256, img_channels=32, in_size=64, final_size=4, cond_channels=32, num_cond_res=64,',
         f'img_resolution={p}, img_channels=32, in_size={s["mouth_in"]}, final_size={s["mouth_bottleneck"]}, cond_channels=32, '
         f'num_cond_res={s["mouth_in"]},', 1),
        ('img_resolution=256, img_channels=32*3,', f'img_resolution={p}, img_channels=32*3,', 1),
        ('self.uv_resolution = 256', f'self.uv_resolution = {p}', 1),
        ('Pytorch3dRasterizer(image_size=256)', f'Pytorch3dRasterizer(image_size={p})', 1),
        ('cond_channels=32, img_resolution=256, img_channels=32, in_size=256, final_size=32, num_cond_res=256,',
         f'cond_channels=32, img_resolution={p}, img_channels=32, in_size={p}, final_size={s["blend_bottleneck"]}, num_cond_res={p},', 1),
        ('v[:, :5023], v[:, 5023:]', f'v[:, :{s["num_vertices"]}], v[:, {s["num_vertices"]}:]', 3),
        ("size=(64, 64), mode='bilinear', antialias=True)", f"size=({s['mouth_in']}, {s['mouth_in']}), mode='bilinear', antialias=True)", 3),
        ('self.rasterizer(transformed_vertices, faces, attributes, 256, 256)', f'self.rasterizer(transformed_vertices, faces, attributes, {p}, {p})', 1),
        ('lm[..., 0] = lm[..., 0] * 128 + 128', f'lm[..., 0] = lm[..., 0] * {half} + {half}', 1),
        ('lm[..., 1] = lm[..., 1] * 128 + 128', f'lm[..., 1] = lm[..., 1] * {half} + {half}', 1),
        raw_copy,
    ]}


def copy_official(src: str, preset: str, sizes: dict, dest: str):
    """The original's packages copied to `dest`, with the size literals replaced."""
    root = src if preset == 'next3d' else os.path.join(src, 'eg3d')
    packages = ['training', 'torch_utils', 'dnnlib'] + (['training_avatar_texture'] if preset == 'next3d' else [])
    for name in packages:
        if not os.path.isdir(os.path.join(root, name)):
            raise click.ClickException(f'{root}: no {name}/ folder; is this a checkout of '
                                       f'{"MrTornado24/Next3D" if preset == "next3d" else "NVlabs/eg3d"}?')
        shutil.copytree(os.path.join(root, name), os.path.join(dest, name))
    for rel, edits in official_patches(preset, sizes).items():
        path = os.path.join(dest, rel)
        with open(path, encoding='utf-8') as f:
            text = f.read()
        for old, new, count in edits:
            found = text.count(old)
            if found != count:
                raise click.ClickException(f'{os.path.join(root, rel)}: expected {count} x {old!r}, found {found}; '
                                           f'this benchmark knows the published code only')
            text = text.replace(old, new)
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)


def _stub(name: str, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _never_called(*args, **kwargs):
    raise RuntimeError('vs_original: a stub that the benchmarked code should not call was called')


def flood_fill(image, mask, seed, new_val, lo_diff, up_diff, flags=0):
    """cv2.floodFill for single-channel float images, 4-connected, range fixed relative to the seed."""
    from scipy import ndimage
    x, y = seed
    value = image[y, x]
    lo, up = float(np.ravel(lo_diff)[0]), float(np.ravel(up_diff)[0])
    inside = (image >= value - lo) & (image <= value + up)
    labels, _ = ndimage.label(inside)
    region = labels == labels[y, x]
    image[region] = float(np.ravel(new_val)[0])
    mask[1:-1, 1:-1][region] = 1
    return int(region.sum()), image, mask, None


def install_stubs(rasterize_fn, read_obj_fn):
    """The modules the original imports that a CPU install lacks (see the module docstring)."""
    import torch
    from PIL import Image

    class Meshes:
        def __init__(self, verts, faces):
            self.verts, self.faces = verts, faces

    def rasterize_meshes(meshes, image_size, blur_radius=0.0, faces_per_pixel=1, bin_size=None, max_faces_per_bin=None,
                         perspective_correct=False, cull_backfaces=False, **kwargs):
        if (blur_radius, faces_per_pixel, perspective_correct) != (0.0, 1, False):
            raise RuntimeError('vs_original: only the rasterizer settings of the original Pytorch3dRasterizer are routed')
        verts, faces = meshes.verts, meshes.faces
        if not bool((faces == faces[:1]).all()):
            raise RuntimeError('vs_original: meshes of a batch must share their faces')
        h, w = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        # pytorch3d's screen NDC has x left and y up; ours x right and y down (a half turn: windings unchanged).
        ours = torch.stack([-verts[..., 0], -verts[..., 1], verts[..., 2]], dim=-1)
        frag = rasterize_fn(ours, faces[0], (h, w), cull_backfaces=cull_backfaces)
        empty = frag.pix_to_face < 0
        offset = torch.arange(len(verts), device=verts.device).reshape(-1, 1, 1) * faces.shape[1]
        pix_to_face = torch.where(empty, -1, frag.pix_to_face + offset)[..., None]
        zbuf = torch.where(empty, -1.0, frag.depth)[..., None]
        bary = torch.where(empty[..., None], -1.0, frag.bary)[..., None, :]
        return pix_to_face, zbuf, bary, torch.full_like(zbuf, -1.0)

    def load_obj(path, *args, **kwargs):
        mesh = read_obj_fn(path)
        faces = types.SimpleNamespace(verts_idx=torch.from_numpy(mesh.f), textures_idx=torch.from_numpy(mesh.ft))
        return torch.from_numpy(mesh.v), faces, types.SimpleNamespace(verts_uvs=torch.from_numpy(mesh.vt))

    def imread(path, *args):
        return np.asarray(Image.open(path).convert('RGB'))[:, :, ::-1].copy()

    _stub('pytorch3d', __path__=[])
    _stub('pytorch3d.io', load_obj=load_obj)
    _stub('pytorch3d.structures', Meshes=Meshes)
    _stub('pytorch3d.renderer', __path__=[])
    _stub('pytorch3d.renderer.mesh', rasterize_meshes=rasterize_meshes)
    _stub('cv2', imread=imread, floodFill=flood_fill, FLOODFILL_FIXED_RANGE=FLOODFILL_FIXED_RANGE, norm=_never_called,
          line=_never_called, circle=_never_called)
    _stub('turtle', update=_never_called)
    _stub('requests', get=_never_called)
    _stub('pydantic', NoneStr=None)
    _stub('matplotlib', __path__=[])
    _stub('matplotlib.image', composite_images=_never_called)
    _stub('torchvision', __path__=[])
    _stub('torchvision.utils', save_image=_never_called)
    # Modules the original imports that current Python removed (distutils in 3.12 where
    # setuptools does not provide it, imp in 3.12): stand-ins only where they are missing.
    for name, attrs in (('distutils.util', dict(strtobool=_never_called)), ('imp', dict(load_module=_never_called))):
        try:
            importlib.import_module(name)
        except ImportError:
            if '.' in name:
                _stub(name.split('.')[0], __path__=[])
            _stub(name, **attrs)


class OriginalSide:
    """The original networks, loss and optimizer step (its training loop's phase body)."""

    def __init__(self, cfg: dict, inputs: dict, workdir: str):
        import torch
        sys.path.insert(0, ROOT)
        from training.mesh import obj_io, rasterize
        rasterize_fn, read_obj_fn = rasterize.rasterize, obj_io.read_obj
        for name in list(sys.modules):          # drop this project's packages: the original uses the same names
            if name.split('.')[0] in ('training', 'torch_utils', 'dnnlib', 'metrics'):
                del sys.modules[name]
        sys.path.remove(ROOT)
        off = cfg['official']
        copy_official(off['src'], cfg['preset'], off['sizes'], workdir)
        os.makedirs(os.path.join(workdir, 'data', 'ffhq'))
        shutil.copy(os.path.join(HEAD_MODEL, 'uv_face_eye_mask.png'), os.path.join(workdir, 'data', 'ffhq'))
        os.chdir(workdir)                       # the original reads data/ffhq/uv_face_eye_mask.png
        sys.path.insert(0, workdir)
        install_stubs(rasterize_fn, read_obj_fn)
        import dnnlib
        from torch_utils.ops import bias_act, conv2d_gradfix, filtered_lrelu, grid_sample_gradfix, upfirdn2d
        self.device = torch.device(cfg['device'])
        self.plugins = {}
        filtered_lrelu._init = lambda: False    # not used by these networks
        for name, op in (('bias_act', bias_act), ('upfirdn2d', upfirdn2d)):
            self.plugins[name] = 'reference (CPU)'
            if self.device.type == 'cuda':      # build and load now, outside any timing
                try:
                    op._init()
                    self.plugins[name] = 'CUDA plugin'
                    continue
                except Exception as e:          # the original raises on a failed build: keep going on its reference
                    self.plugins[name] = f'reference (its CUDA plugin failed: {str(e).strip().splitlines()[-1][:200]})'
            op._init = lambda: False
        conv2d_gradfix.enabled = self.device.type == 'cuda'     # as its training loop (a no-op off the GPU)
        grid_sample_gradfix.enabled = False
        self.next3d = cfg['preset'] == 'next3d'
        common = dict(c_dim=25, img_resolution=cfg['img_resolution'], img_channels=3)
        self.G = dnnlib.util.construct_class_by_name(**off['G'], **common).train().requires_grad_(False).to(self.device)
        self.D = dnnlib.util.construct_class_by_name(**off['D'], **common).train().requires_grad_(False).to(self.device)
        loss_class = ('training_avatar_texture' if self.next3d else 'training') + '.loss.StyleGAN2Loss'
        self.loss = dnnlib.util.construct_class_by_name(
            class_name=loss_class, device=self.device, G=self.G, D=self.D, r1_gamma=cfg['r1_gamma'],
            gpc_reg_prob=cfg['gpc_reg_prob'], neural_rendering_resolution_initial=cfg['raw'], dual_discrimination=True,
            filter_mode='antialiased', blur_init_sigma=0)
        self.opts = {}
        for name, module, kwargs, interval in (('G', self.G, ADAM, 4), ('D', self.D, ADAM_D, 16)):
            r = interval / (interval + 1)           # lazy regularization, as the original's loop
            self.opts[name] = torch.optim.Adam(module.parameters(), lr=kwargs['lr'] * r,
                                               betas=tuple(b ** r for b in kwargs['betas']), eps=kwargs['eps'])
        self.inputs = inputs
        self.z_dim = self.G.z_dim

    def phase(self, name: str, interval: int):
        import torch
        real, c, v = self.inputs['real'], self.inputs['c'], self.inputs['v']
        module, opt = (self.G, self.opts['G']) if name[0] == 'G' else (self.D, self.opts['D'])
        z = torch.randn([len(real), self.z_dim], device=self.device)
        opt.zero_grad(set_to_none=True)
        module.requires_grad_(True)
        if self.next3d:
            self.loss.accumulate_gradients(phase=name, real_img=real, real_c=c, gen_z=z, gen_c=c, gen_v=v, gain=interval, cur_nimg=CUR_NIMG)
        else:
            self.loss.accumulate_gradients(phase=name, real_img=real, real_c=c, gen_z=z, gen_c=c, gain=interval, cur_nimg=CUR_NIMG)
        module.requires_grad_(False)
        params = [p for p in module.parameters() if p.numel() > 0 and p.grad is not None]
        if params:
            flat = torch.cat([p.grad.flatten() for p in params])
            torch.nan_to_num(flat, nan=0, posinf=1e5, neginf=-1e5, out=flat)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.reshape(p.shape))
        opt.step()

    def infer(self):
        import torch
        z = torch.randn([len(self.inputs['c']), self.z_dim], device=self.device)
        self.G.eval()
        with torch.no_grad():
            if self.next3d:
                self.G(z, self.inputs['c'], self.inputs['v'], noise_mode='const')
            else:
                self.G(z, self.inputs['c'], noise_mode='const')
        self.G.train()


class OursSide:
    """This project's networks, loss and optimizer step (training_loop.run_step's phase body)."""

    def __init__(self, cfg: dict, inputs: dict, workdir: str):
        import torch
        sys.path.insert(0, ROOT)
        from training import configs, distributed
        from training.loss import Next3DLoss
        from training.training_loop import setup_phases
        from torch_utils import host_memory
        host_memory.keep_freed_memory()         # as training_loop does
        ours = cfg['ours']
        self.device = torch.device(cfg['device'])
        self.G = configs.make_generator(ours['G_cfg'], **ours['G']).train().requires_grad_(False).to(self.device)
        self.D = configs.make_discriminator('small128').train().requires_grad_(False).to(self.device)
        self.loss = Next3DLoss(self.device, self.G, self.D, r1_gamma=cfg['r1_gamma'], gpc_reg_prob=cfg['gpc_reg_prob'],
                               neural_rendering_resolution_initial=cfg['raw'])
        self.phases = {p.name: p for p in setup_phases(self.G, self.D, dict(ADAM), dict(ADAM_D), 4, 16)}
        self.loss.compile_networks(cfg.get('compile', 'none'), cfg.get('compile_backend'), log=lambda line: print(line, file=sys.stderr))
        self.all_reduce_grads = distributed.all_reduce_grads
        self.inputs = inputs
        self.v = inputs['v'] if cfg['preset'] == 'next3d' else None
        self.geometry = None
        if cfg.get('geometry_in_loader') and self.v is not None:     # made once, untimed: train.py's loader workers make it
            with torch.no_grad():
                self.geometry = self.G.mesh_geometry(self.v)

    def phase(self, name: str, interval: int):
        import torch
        real, c = self.inputs['real'], self.inputs['c']
        phase = self.phases[name]
        z = torch.randn([len(real), self.G.z_dim], device=self.device)
        phase.opt.zero_grad(set_to_none=True)
        phase.module.requires_grad_(True)
        self.loss.accumulate_gradients(name, real, c, self.v, z, c, self.v, gain=interval, cur_nimg=CUR_NIMG, gen_geometry=self.geometry)
        phase.module.requires_grad_(False)
        self.all_reduce_grads(list(phase.module.parameters()))
        phase.opt.step()

    def infer(self):
        import torch
        z = torch.randn([len(self.inputs['c']), self.G.z_dim], device=self.device)
        self.G.eval()
        with torch.no_grad():      # G's forward, through the loss's (maybe compiled) synthesis
            ws = self.G.mapping(z, self.inputs['c'])
            self.loss.synthesis_forward(ws, self.inputs['c'], self.v, noise_mode='const')
        self.G.train()


def convolution_seconds(side_obj) -> dict:
    """CPU seconds inside convolutions (aten.convolution and convolution_backward, i.e. every
    conv2d and conv_transpose2d, forward and backward) in each phase run once and in one
    inference: {phase name or 'infer': seconds}. Only those calls are timed, by a dispatch
    mode; the mode's own overhead on the other ops falls outside them."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    conv_ops = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)
    spent = [0.0]

    class ConvolutionTimer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func not in conv_ops:
                return func(*args, **(kwargs or {}))
            start = time.process_time()
            out = func(*args, **(kwargs or {}))
            spent[0] += time.process_time() - start
            return out

    seconds = {}
    with ConvolutionTimer():
        for name, interval in PHASES + (('infer', None),):
            spent[0] = 0.0
            if interval is None:
                side_obj.infer()
            else:
                side_obj.phase(name, interval)
            seconds[name] = spent[0]
    return seconds


def stage_seconds(side_obj, stages, calls: int = STAGE_CALLS) -> dict:
    """CPU seconds of each stage of an inference: {label: median over `calls` inferences},
    plus 'rest' (the time outside the stages) and 'inference' (the whole call), each the median
    of its own over the same calls. stages: (label, path) pairs, path a
    module under side_obj.G ('a.b', timed by forward hooks) or a method of G ('name()',
    wrapped for the calls). Stages must not nest. The hooks and the wrapper are removed after."""
    import torch
    G = side_obj.G
    spent, started, undo = {}, {}, []
    for label, path in stages:
        if path.endswith('()'):
            name = path[:-2]
            method = getattr(G, name)

            def timed(*args, _method=method, _label=label, **kwargs):
                start = time.process_time()
                try:
                    return _method(*args, **kwargs)
                finally:
                    spent[_label] += time.process_time() - start
            hidden = vars(G).get(name)              # an instance attribute it replaces, if any (else the class's method)
            setattr(G, name, timed)
            undo.append(lambda name=name, hidden=hidden: setattr(G, name, hidden) if hidden is not None else delattr(G, name))
        else:
            module = G.get_submodule(path)
            pre = module.register_forward_pre_hook(lambda m, args, label=label: started.__setitem__(label, time.process_time()))
            post = module.register_forward_hook(
                lambda m, args, out, label=label: spent.__setitem__(label, spent[label] + time.process_time() - started[label]))
            undo += [pre.remove, post.remove]
    samples = []
    try:
        for _ in range(calls):
            spent.update({label: 0.0 for label, _ in stages})
            start = time.process_time()
            side_obj.infer()
            total = time.process_time() - start
            samples.append(dict(spent, rest=total - sum(spent.values()), inference=total))
    finally:
        for fn in undo:
            fn()
    return {k: float(np.median([sample[k] for sample in samples])) for k in samples[0]}


def run_worker(side: str, cfg_path: str):
    """Serve the parent: one JSON request per line on stdin, one JSON reply per line."""
    reply_stream = os.fdopen(os.dup(1), 'w')
    os.dup2(2, 1)                               # anything the code prints goes to stderr
    sys.stdout = sys.stderr
    import resource
    import torch
    torch.set_num_threads(1)
    with open(cfg_path) as f:
        cfg = json.load(f)
    device = torch.device(cfg['device'])
    if device.type == 'cuda':                   # as both training loops set the device up
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    inputs = {k: torch.from_numpy(v).to(device) for k, v in np.load(cfg['inputs']).items()}
    torch.manual_seed(0)
    if side == 'original' and cfg.get('original_allocator') == 'ours':
        sys.path.insert(0, ROOT)
        from torch_utils import host_memory     # (the original side drops this project's packages again)
        host_memory.keep_freed_memory()
        sys.path.remove(ROOT)
    with tempfile.TemporaryDirectory() as workdir:
        side_obj = (OursSide if side == 'ours' else OriginalSide)(cfg, inputs, workdir)
        n_params = [sum(p.numel() for p in m.parameters()) for m in (side_obj.G, side_obj.D)]

        def train_step():
            times = {}
            for name, interval in PHASES:
                sync()
                wall, cpu = time.perf_counter(), time.process_time()
                side_obj.phase(name, interval)
                sync()
                times[name] = (time.perf_counter() - wall, time.process_time() - cpu)
            return times

        def infer():
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            side_obj.infer()
            sync()
            return time.perf_counter() - wall, time.process_time() - cpu

        def profile():
            from torch.profiler import ProfilerActivity, profile as torch_profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
            with torch_profile(activities=activities) as prof:
                train_step()

            def top(events, self_time):
                events = sorted((e for e in events if self_time(e) > 0), key=lambda e: -self_time(e))
                return dict(total_ms=sum(self_time(e) for e in events) / 1e3,
                            top=[(e.key, self_time(e) / 1e3, e.count) for e in events[:10]])
            averages = prof.key_averages()
            host = top([e for e in averages if e.device_type == torch.autograd.DeviceType.CPU], lambda e: e.self_cpu_time_total)
            if device.type != 'cuda':
                return host
            # On the GPU: the kernels by their time on the device, and the host's ops by CPU time.
            kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu = top(kernels, lambda e: getattr(e, 'self_device_time_total', None) or getattr(e, 'self_cuda_time_total', 0))
            return dict(gpu, host=host, kernels=sum(e.count for e in kernels))

        def convolutions():
            return convolution_seconds(side_obj)

        def stages():
            return stage_seconds(side_obj, [(label, ours if side == 'ours' else original)
                                            for label, ours, original in INFERENCE_STAGES[cfg['preset']]])

        def info():
            out = dict(params=n_params, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                       plugins=getattr(side_obj, 'plugins', None))     # the original's custom ops
            if device.type == 'cuda':
                out['peak_gpu_gib'] = torch.cuda.max_memory_allocated(device) / 2**30
            return out

        handlers = dict(train=train_step, infer=infer, profile=profile, convolutions=convolutions, stages=stages, info=info)
        reply_stream.write(json.dumps(dict(ready=True)) + '\n')
        reply_stream.flush()
        for line in sys.stdin:
            request = json.loads(line)
            if request['cmd'] == 'quit':
                break
            reply_stream.write(json.dumps(dict(result=handlers[request['cmd']]())) + '\n')
            reply_stream.flush()


# ---------------------------------------------------------------------------------------
# Parent

class Worker:
    """One side's worker process: commands on its stdin, one JSON line per reply on its
    stdout, its stderr into log_path. The torch.compile lines it logs are collected in
    compile_lines while it works, and passed to echo if given (a run cut short by a time
    limit still shows how far the compiles got)."""

    POLL_SECONDS = 5        # how often a waiting parent reads the log

    def __init__(self, side: str, cfg_path: str, log_path: str, echo=None):
        self.side, self.log_path, self.echo = side, log_path, echo
        env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONHASHSEED='0')
        self.log = open(log_path, 'w')
        self.log_offset = 0                     # how far new_log_lines() has read
        self.compile_lines = []
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--worker', side, '--worker-config', cfg_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self._read()

    def _collect_compile_lines(self):
        for line in self.new_log_lines():
            if 'torch.compile' in line:
                self.compile_lines.append(line.strip())
                if self.echo is not None:
                    self.echo(line.strip())

    def _read(self):
        # The reply is one line: nothing sits in stdout's buffer while we wait.
        while not select.select([self.proc.stdout], [], [], self.POLL_SECONDS)[0]:
            self._collect_compile_lines()
        line = self.proc.stdout.readline()
        self._collect_compile_lines()
        if not line:
            self.log.flush()
            with open(self.log_path) as f:
                tail = f.read()[-3000:]
            raise click.ClickException(f'the {self.side} worker stopped; its last output:\n{tail}')
        return json.loads(line).get('result')

    def call(self, cmd: str):
        self.proc.stdin.write(json.dumps(dict(cmd=cmd)) + '\n')
        self.proc.stdin.flush()
        return self._read()

    def new_log_lines(self) -> list:
        """The complete lines the worker logged (its stderr) since the last call."""
        with open(self.log_path, 'rb') as f:
            f.seek(self.log_offset)
            data = f.read()
        complete = data[:data.rfind(b'\n') + 1]
        self.log_offset += len(complete)
        return complete.decode(errors='replace').splitlines()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps(dict(cmd='quit')) + '\n')
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        self.log.close()


def step_time(phase_times: dict, which: int) -> float:
    """Amortised seconds of one training step (which: 0 = wall, 1 = CPU)."""
    return sum(phase_times[name][which] / interval for name, interval in PHASES)


def median(values):
    return float(np.median(values))


def run_preset(preset: str, cfg: dict, tmp: str, pairs: int, log):
    cfg_path = os.path.join(tmp, f'{preset}.json')
    with open(cfg_path, 'w') as f:
        json.dump(cfg, f)
    log(f'{preset}: starting the workers ...')
    echo = lambda line: log(f'  {line}')     # our torch.compile lines (compile times, any fallback) as they come
    workers = {side: Worker(side, cfg_path, os.path.join(tmp, f'{preset}-{side}.log'), echo if side == 'ours' else None)
               for side in ('ours', 'original')}
    try:
        for side, w in workers.items():         # warm-up (with --compile: the compiles), reported as it goes
            for what in ('train', 'infer'):
                start = time.time()
                w.call(what)
                log(f'{preset}: {side} warm-up {what} in {time.time() - start:.1f} s')
        samples = {side: dict(train=[], infer=[]) for side in workers}
        for i in range(pairs):
            order = ('ours', 'original') if i % 2 == 0 else ('original', 'ours')
            for what in ('train', 'infer'):
                for side in order:
                    samples[side][what].append(workers[side].call(what))
            t = samples['ours']['train'][-1], samples['original']['train'][-1]
            inf = samples['ours']['infer'][-1][0], samples['original']['infer'][-1][0]
            log(f'{preset} pair {i + 1}/{pairs}: train step ours {step_time(t[0], 0):.2f} s, original {step_time(t[1], 0):.2f} s; '
                f'inference ours {inf[0]:.3f} s, original {inf[1]:.3f} s (wall)')
        profiles = {side: w.call('profile') for side, w in workers.items()}
        info = {side: w.call('info') for side, w in workers.items()}
        # A dispatch mode or module hooks around compiled graphs would time something else; on a GPU, launches.
        if cfg.get('compile', 'none') == 'none' and cfg.get('device', 'cpu') == 'cpu':
            for side, w in workers.items():
                info[side]['convolutions'] = w.call('convolutions')
                info[side]['stages'] = w.call('stages')
    finally:
        for w in workers.values():
            w.close()
    info['ours']['compile_log'] = workers['ours'].compile_lines     # what torch.compile said: compile times, any fallback
    return samples, profiles, info


def summarise(preset: str, samples: dict, profiles: dict, info: dict, device: str = 'cpu') -> list:
    """(rows of the ratio table, lines of the details). On the CPU the rows give wall and CPU
    time and the phases CPU time; on a GPU, where the host waits for the device, wall time only.
    A row: (preset, measurement, ours' median, the original's median, the median of the pairs'
    ratios ours / original, (their lowest, their highest))."""
    ours, orig = samples['ours'], samples['original']
    clocks = ((0, 'wall'), (1, 'CPU')) if device == 'cpu' else ((0, 'wall'),)
    main_clock, main_label = clocks[-1][0], ('CPU' if device == 'cpu' else 'wall-clock')
    rows = []
    for which, label in clocks:
        ratios = [step_time(a, which) / step_time(b, which) for a, b in zip(ours['train'], orig['train'])]
        rows.append((preset, f'training step ({label})', median([step_time(a, which) for a in ours['train']]),
                     median([step_time(b, which) for b in orig['train']]), median(ratios), (min(ratios), max(ratios))))
    for which, label in clocks:
        ratios = [a[which] / b[which] for a, b in zip(ours['infer'], orig['infer'])]
        rows.append((preset, f'inference ({label})', median([a[which] for a in ours['infer']]),
                     median([b[which] for b in orig['infer']]), median(ratios), (min(ratios), max(ratios))))
    lines = []
    for name, _ in PHASES:
        ours_t, orig_t = [a[name][main_clock] for a in ours['train']], [b[name][main_clock] for b in orig['train']]
        ratios = [a / b for a, b in zip(ours_t, orig_t)]
        lines.append(f'| {name} | {median(ours_t):.3f} | {median(orig_t):.3f} | {median(ratios):.2f} |')
    detail = [f'### {preset}: phases ({main_label} seconds, median; each phase once per pair)', '',
              '| phase | ours | original | ours / original |', '|---|---|---|---|'] + lines + ['']
    # Every pair, in the order run: a slow stretch of a shared machine shows as a run of low ratios.
    detail += [f'### {preset}: each pair ({main_label} seconds; speed-up = original / ours)', '',
               '| pair | training step: ours | original | speed-up | inference: ours | original | speed-up |',
               '|---|---|---|---|---|---|---|']
    for i, (a, b, ia, ib) in enumerate(zip(ours['train'], orig['train'], ours['infer'], orig['infer'])):
        sa, sb = step_time(a, main_clock), step_time(b, main_clock)
        detail.append(f'| {i + 1} | {sa:.3f} | {sb:.3f} | {sb / sa:.2f}x | {ia[main_clock]:.3f} | {ib[main_clock]:.3f} | '
                      f'{ib[main_clock] / ia[main_clock]:.2f}x |')
    detail.append('')
    memory = (f'Peak resident memory of the worker: ours {info["ours"]["peak_rss_gib"]:.2f} GiB, original '
              f'{info["original"]["peak_rss_gib"]:.2f} GiB.')
    if 'peak_gpu_gib' in info['ours']:
        memory = (f'Peak GPU memory allocated: ours {info["ours"]["peak_gpu_gib"]:.2f} GiB, original '
                  f'{info["original"]["peak_gpu_gib"]:.2f} GiB. ' + memory)
    detail += [f'Parameters: ours G {info["ours"]["params"][0]:,}, D {info["ours"]["params"][1]:,}; original G '
               f'{info["original"]["params"][0]:,} (incl. sub-networks its forward never runs), D {info["original"]["params"][1]:,}. '
               + memory, '']
    if info['original'].get('plugins'):
        detail += ["The original's custom ops: " + ', '.join(f'{k}: {v}' for k, v in info['original']['plugins'].items()) + '.', '']
    if 'convolutions' in info['ours']:
        conv = {side: info[side]['convolutions'] for side in ('ours', 'original')}
        conv_step = {side: sum(conv[side][name] / interval for name, interval in PHASES) for side in conv}
        step = {'ours': median([step_time(a, 1) for a in ours['train']]), 'original': median([step_time(b, 1) for b in orig['train']])}
        infer = {'ours': median([a[1] for a in ours['infer']]), 'original': median([b[1] for b in orig['infer']])}
        detail += [f'### {preset}: time inside convolutions (CPU seconds, forward and backward, one run under a timer of those ops)', '',
                   '| measurement | ours: convolutions | ours: the rest | original: convolutions | original: the rest | ceiling |',
                   '|---|---|---|---|---|---|']
        for label, c, total in (('training step', conv_step, step), ('inference', {s: conv[s]['infer'] for s in conv}, infer)):
            detail.append(f'| {label} | {c["ours"]:.3f} | {total["ours"] - c["ours"]:.3f} | {c["original"]:.3f} | '
                          f'{total["original"] - c["original"]:.3f} | {total["original"] / c["ours"]:.2f}x |')
        detail += ['', 'The rest = the median time of the table above minus the convolutions. Ceiling = the original\'s time '
                   'over our convolutions alone: the speed-up if everything else on our side took no time.', '']
    if 'stages' in info['ours']:
        detail += stage_table(preset, {side: info[side]['stages'] for side in ('ours', 'original')})
    if info['ours'].get('compile_log'):
        detail += [f'torch.compile on our side ({len(info["ours"]["compile_log"])} lines of the worker\'s log):', '']
        detail += [f'- {line}' for line in info['ours']['compile_log']] + ['']
    for side in ('ours', 'original'):
        p = profiles[side]
        if device == 'cpu':
            tables = [(f'top 10 ops by self CPU time (one step, all four phases once; total {p["total_ms"] / 1e3:.3f} s)', 'self CPU ms', p)]
        else:
            tables = [(f'top 10 GPU kernels by time (one step, all four phases once; {p["kernels"]:,} kernels, '
                       f'{p["total_ms"] / 1e3:.3f} s on the device)', 'GPU ms', p),
                      (f'top 10 host ops by self CPU time (the same step; total {p["host"]["total_ms"] / 1e3:.3f} s)', 'self CPU ms', p['host'])]
        for title, unit, t in tables:
            detail += [f'### {preset}, {side}: {title}', '', f'| op | {unit} | share | calls |', '|---|---|---|---|']
            detail += [f'| `{k[:120]}` | {ms:.1f} | {100 * ms / t["total_ms"]:.1f}% | {n} |' for k, ms, n in t['top']] + ['']
    return rows, detail


def stage_table(preset: str, stages: dict) -> list:
    """Lines of the table of one inference by stage, stages = {side: stage_seconds' result}."""
    labels = [k for k in stages['ours'] if k not in ('rest', 'inference')]
    rows = [(k, stages['ours'][k], stages['original'][k]) for k in labels]
    rows.append(('the rest (outside these stages)', stages['ours']['rest'], stages['original']['rest']))
    rows.append(('**inference**', stages['ours']['inference'], stages['original']['inference']))
    speed_up = lambda a, b: f'{b / a:.2f}x' if a > 0 else '-'
    return ([f'### {preset}: one inference by stage (CPU seconds, median of {STAGE_CALLS} inferences after the pairs; '
             'timers around these modules of G; each row the median of its own)', '', '| stage | ours | original | speed-up |',
             '|---|---|---|---|']
            + [f'| {label} | {a:.3f} | {b:.3f} | {speed_up(a, b)} |' for label, a, b in rows] + [''])


@click.command()
@click.option('--original-src', type=click.Path(exists=True, file_okay=False), help='Checkout of MrTornado24/Next3D')
@click.option('--eg3d-src', type=click.Path(exists=True, file_okay=False), help='Checkout of NVlabs/eg3d (adds the EG3D rows)')
@click.option('--pairs', type=click.IntRange(min=1), default=5, show_default=True, help='Interleaved ours/original pairs per measurement')
@click.option('--batch', type=click.IntRange(min=1), default=4, show_default=True, help='Batch size')
@click.option('--compile', 'which', type=click.Choice(['none', 'D', 'G', 'all']), default='none', show_default=True,
              help='Our side through torch.compile (train.py --compile; the first, compiling calls are the warm-up)')
@click.option('--compile-backend', 'compile_backend', type=click.Choice(COMPILE_BACKENDS), default=None, show_default=COMPILE_BACKENDS[0], help='The backend of --compile (train.py --compile-backend)')
@click.option('--original-allocator', type=click.Choice(['default', 'ours']), default='default', show_default=True,
              help="The original's host memory policy: glibc's default, or ours (torch_utils/host_memory.py, which our scripts set)")
@click.option('--geometry-in-loader', is_flag=True,
              help="Our training phases get the meshes' geometry made beforehand, untimed (what the loader's workers make under "
              'train.py --geometry-in-loader); inference still rasterizes')
@click.option('--device', type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True,
              help="Where both sides run (on cuda: each side's CUDA kernels, wall-clock time)")
@click.option('--prepare', is_flag=True, help="Only build the original's CUDA plugins (with --device cuda), then exit: "
              'the slow first step, for a script to run while it does other work')
@click.option('--outdir', help='Folder for the result table (markdown)', default=os.path.join(ROOT, 'benchmarks', 'results'), show_default='benchmarks/results')
@click.option('--worker', type=click.Choice(['ours', 'original']), hidden=True)
@click.option('--worker-config', hidden=True)
def main(original_src, eg3d_src, pairs, batch, which, compile_backend, original_allocator, geometry_in_loader, device, prepare, outdir, worker, worker_config):
    """Compare training and inference speed with the original code, side by side."""
    if worker is not None:
        run_worker(worker, worker_config)
        return
    if original_src is None and eg3d_src is None:
        raise click.ClickException('give --original-src (Next3D) and/or --eg3d-src (EG3D)')
    sys.path.insert(0, ROOT)
    from benchmarks.common import device_name, git_commit, load_average
    import torch
    torch.set_num_threads(1)
    if device == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device cuda: this PyTorch sees no CUDA device')
    if compile_backend is not None and which == 'none':
        raise click.ClickException('--compile-backend applies to --compile=D, G or all only')
    compile_backend = compile_backend or COMPILE_BACKENDS[0]
    if geometry_in_loader and original_src is None:
        raise click.ClickException('--geometry-in-loader applies to the Next3D rows (--original-src) only: EG3D has no meshes')
    if prepare and device != 'cuda':
        raise click.ClickException("--prepare builds the original's CUDA plugins: give --device cuda")
    presets = [(p, src) for p, src in (('next3d', original_src), ('eg3d', eg3d_src)) if src is not None]
    for preset, src in presets:
        if not os.path.isfile(os.path.join(src, CHECKOUT_MARKERS[preset])):
            raise click.ClickException(f'{src}: no {CHECKOUT_MARKERS[preset]}; is this a checkout of '
                                       f'{"MrTornado24/Next3D" if preset == "next3d" else "NVlabs/eg3d"}?')
    if prepare:                 # the plugins' sources are the same in both checkouts: one build serves both
        preset, src = presets[0]
        with tempfile.TemporaryDirectory() as tmp:
            cfg = dict(make_config(preset, batch, os.path.abspath(src)), inputs=os.path.join(tmp, 'inputs.npz'), device=device)
            make_inputs(cfg['inputs'], batch, cfg['img_resolution'])
            cfg_path = os.path.join(tmp, f'{preset}.json')
            with open(cfg_path, 'w') as f:
                json.dump(cfg, f)
            worker = Worker('original', cfg_path, os.path.join(tmp, 'original.log'))
            plugins = worker.call('info')['plugins']
            worker.close()
        click.echo("The original's custom ops: " + ', '.join(f'{k}: {v}' for k, v in plugins.items()))
        sys.exit(0 if all(v == 'CUDA plugin' for v in plugins.values()) else 1)
    load_before, start = load_average(), time.time()
    all_rows, all_detail, all_compile_logs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, src in presets:
            cfg = make_config(preset, batch, os.path.abspath(src))
            cfg['inputs'] = os.path.join(tmp, 'inputs.npz')
            cfg['compile'] = which
            cfg['compile_backend'] = compile_backend
            cfg['original_allocator'] = original_allocator
            cfg['geometry_in_loader'] = geometry_in_loader
            cfg['device'] = device
            make_inputs(cfg['inputs'], batch, cfg['img_resolution'])
            samples, profiles, info = run_preset(preset, cfg, tmp, pairs, click.echo)
            all_compile_logs += info['ours'].get('compile_log', [])
            rows, detail = summarise(preset, samples, profiles, info, device=device)
            all_rows += rows
            all_detail += detail
    now = datetime.datetime.now(datetime.timezone.utc)
    command = 'python benchmarks/vs_original.py' + ''.join(
        f' {flag}' for flag, on in (('--original-src=<Next3D checkout>', original_src), ('--eg3d-src=<eg3d checkout>', eg3d_src)) if on) + \
        f' --pairs={pairs} --batch={batch}' + (f' --compile={which}' if which != 'none' else '') + \
        (f' --compile-backend={compile_backend}' if compile_backend != COMPILE_BACKENDS[0] else '') + \
        (f' --original-allocator={original_allocator}' if original_allocator != 'default' else '') + \
        (' --geometry-in-loader' if geometry_in_loader else '') + \
        (f' --device={device}' if device != 'cpu' else '')
    if device == 'cuda':
        title = 'one GPU'
        machine = (f'{device_name(torch.device("cuda"))} (CUDA {torch.version.cuda}); host: '
                   f'{device_name(torch.device("cpu")).rsplit(" (", 1)[0]}, {os.cpu_count()} CPUs; each worker 1 CPU thread')
    else:
        title = 'CPU, one thread each'
        machine = f'{device_name(torch.device("cpu")).rsplit(" (", 1)[0]}, {os.cpu_count()} CPUs; each worker 1 thread'
    digits = 3 if device == 'cpu' else 4
    text = '\n'.join([
        f"# This project vs the original code, {title}", '',
        f'- command: `{command}`',
        f'- date: {now:%Y-%m-%d %H:%M} UTC; git commit: {git_commit()}; torch {torch.__version__}',
        f'- machine: {machine}',
        f'- system load average (1 min) before / after: {load_before:.1f} / {load_average():.1f}; total {time.time() - start:.0f} s',
        f'- batch {batch}; small128 sizes (output 128, raw 64, 24 + 24 samples per ray); medians over {pairs} interleaved pairs',
        f'- host memory: ours keeps freed memory in the heap (torch_utils/host_memory.py, as train.py and the scripts do); '
        f"original: {'the same policy' if original_allocator == 'ours' else 'glibc defaults'}",
    ] + (["- ours (Next3D): each training phase is given its meshes' geometry made beforehand and not timed, as the data "
          "loader's workers make it under train.py --geometry-in-loader (the original rasterizes in its step); inference rasterizes"]
         if geometry_in_loader else []) + [
        '', '| preset | measurement | ours (s) | original (s) | ours / original | speed-up | speed-up, lowest-highest pair |',
        '|---|---|---|---|---|---|---|',
    ] + [f'| {p} | {m} | {a:.{digits}f} | {b:.{digits}f} | {r:.2f} | {1 / r:.2f}x | {1 / hi:.2f}-{1 / lo:.2f}x |'
         for p, m, a, b, r, (lo, hi) in all_rows] + [''] + all_detail)
    click.echo(text)
    os.makedirs(outdir, exist_ok=True)
    suffix = ((f'-compile-{which}' if which != 'none' else '') + (f'-{compile_backend}' if compile_backend != COMPILE_BACKENDS[0] else '') + ('-same-allocator' if original_allocator == 'ours' else '')
              + ('-geometry-in-loader' if geometry_in_loader else ''))
    path = os.path.join(outdir, f'vs_original-{device}-{now:%Y-%m-%d-%H%M}{suffix}.md')        # one file per run
    with open(path + '.tmp', 'w') as f:
        f.write(text)
    os.replace(path + '.tmp', path)
    click.echo(f'Wrote {path}')
    fallbacks = [line for line in all_compile_logs if 'running it eagerly' in line]
    if fallbacks:               # the table then times eager networks, not compiled ones
        click.echo(f'Error: --compile={which}: {len(fallbacks)} network(s) fell back to eager mode (the compile log in {path})', err=True)
        sys.exit(1)


if __name__ == '__main__':
    main()
