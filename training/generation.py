"""Shared pieces of the generation scripts: loading a generator, its mesh condition,
the cameras they render from, and image grids."""

import functools
import io
import os

import numpy as np
import PIL.Image
import torch

from torch_utils.persistence import atomic_write_bytes
from training import coords
from training.driving import DEFAULT_LMS, DEFAULT_OBJ, load_condition
from training.next3d_generator import NUM_LANDMARKS
from training.network_pickle import load_network_pkl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_NETWORK = os.path.join('pretrained_models', 'next3d-synthetic64.pkl')
BUNDLED_DRIVING = os.path.join(ROOT, 'data', 'driving')     # the synthetic driving folder (data/driving/README.md)


def load_generator(network_pkl: str, device: torch.device, uv_mask_path: str = None) -> torch.nn.Module:
    """G_ema of a snapshot or official pickle, in eval mode on `device`.

    uv_mask_path: the face/eye UV mask PNG for official Next3D pickles that lack it.
    """
    return load_network(network_pkl, device, uv_mask_path).G_ema


def load_network(network_pkl: str, device: torch.device, uv_mask_path: str = None):
    """The whole network file (EasyDict of load_network_pkl) with its G_ema in eval mode on `device`.

    Besides G_ema: training_set_kwargs, and for an avatar of invert.py its `projected_w`.
    """
    path = network_pkl
    if not os.path.isfile(path) and os.path.isfile(os.path.join(ROOT, path)):
        path = os.path.join(ROOT, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{network_pkl}: no such network file')
    print(f'Loading networks from "{path}"...')
    data = load_network_pkl(path, uv_mask_path=uv_mask_path)
    if data.get('import_report'):
        from training.official_import import format_report
        print(format_report(data['import_report']))
    G = data['G_ema']
    if G is None:
        raise ValueError(f'{path}: holds no generator (G_ema or G)')
    data['G_ema'] = G.eval().requires_grad_(False).to(device)
    return data


def check_projected_w(w, G, source: str) -> torch.Tensor:
    """An avatar's ws as (K, num_ws, w_dim) float32: accepts (num_ws, w_dim) or (K, num_ws, w_dim); else ValueError naming `source`."""
    w = torch.as_tensor(np.asarray(w, dtype=np.float32) if not torch.is_tensor(w) else w.detach().float().cpu())
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3 or w.shape[0] < 1 or tuple(w.shape[1:]) != (G.num_ws, G.w_dim):
        raise ValueError(f'{source}: w of shape {tuple(w.shape)}; this generator takes ({G.num_ws}, {G.w_dim}) or '
                         f'(K, {G.num_ws}, {G.w_dim}): {G.num_ws} ws of {G.w_dim} values (a latent of another network?)')
    if not torch.isfinite(w).all():
        raise ValueError(f'{source}: w holds non-finite values')
    return w


def load_projected_w(path: str, G) -> torch.Tensor:
    """The 'w' array of an .npz written by invert.py (or EG3D's projector) -> (K, num_ws, w_dim) float32, checked against G."""
    import zipfile
    if not zipfile.is_zipfile(path):        # np.load would try it as a pickle and talk about unsafe loading
        raise ValueError(f'{path}: not an .npz file (expected the projected_w.npz of invert.py, with an array w)')
    try:
        with np.load(path, allow_pickle=False) as data:
            if 'w' not in data.files:
                raise ValueError(f'{path}: no array named w (it holds {", ".join(data.files) or "nothing"})')
            w = data['w']
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f'{path}: not an .npz file with a w array ({e})') from None
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f'{path}: not an .npz file with a w array ({e})') from None
    return check_projected_w(w, G, path)


SEED_OPTIONS = {'seeds': '--seeds', 'truncation_psi': '--trunc', 'truncation_cutoff': '--trunc-cutoff'}   # parameter -> option


def options_given(ctx, names: dict) -> list:
    """The options of `names` (click parameter name -> option) that the user gave on the command line of `ctx`."""
    import click
    return [flag for name, flag in names.items() if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]


def avatar_latents(G, data, network_pkl: str, projected_w_path: str = None, explicit=()) -> torch.Tensor:
    """The ws (K, num_ws, w_dim) of an inverted avatar on G's device, or None to render seeds.

    From --projected-w when given, else the snapshot's `projected_w` (invert.py stores it)
    unless --seeds was given. `explicit`: the seed options the user gave (e.g. '--seeds',
    '--trunc'): with an avatar they would be ignored, so they are refused (click.UsageError).
    """
    import click
    device = next(G.parameters()).device
    stored = data.get('projected_w')
    if projected_w_path is None and (stored is None or '--seeds' in explicit):
        return None
    if explicit:
        what = ('the --projected-w avatar' if projected_w_path is not None else
                f'the inverted avatar stored in {network_pkl} (add --seeds to render seeds instead)')
        raise click.UsageError(f'{", ".join(explicit)} do{"es" if len(explicit) == 1 else ""} not apply to {what}')
    if projected_w_path is not None:
        return load_projected_w(projected_w_path, G).to(device)
    print(f'Rendering the inverted avatar stored in {network_pkl} (projected_w; --seeds renders seeds instead)')
    return check_projected_w(stored, G, f'{network_pkl} [projected_w]').to(device)


def uses_mesh(G) -> bool:
    """Whether G is driven by a mesh (Next3D) or not (EG3D)."""
    return getattr(G, 'num_vertices', None) is not None


def check_mesh_options(G, network_pkl: str, obj_path: str = None, lms_path: str = None, lms_cond: bool = True):
    """Refuse mesh options that would be ignored (click.UsageError): any for EG3D, --lms_path with --lms_cond=false."""
    import click
    if not uses_mesh(G) and (obj_path is not None or lms_path is not None):
        raise click.UsageError(f'{network_pkl}: this generator is not mesh-driven (EG3D); --obj_path/--lms_path do not apply')
    if lms_path is not None and not lms_cond:
        raise click.UsageError('--lms_path is not read with --lms_cond=false (the landmarks are computed from the mesh)')


def read_mesh_condition(obj_path: str = None, lms_path: str = None, lms_cond: bool = True) -> torch.Tensor:
    """The (1, V + 68, 3) condition from an .obj and its landmarks, read and checked before any network is loaded.

    Defaults to the bundled head's neutral mesh. With lms_cond False the landmarks are
    computed from the mesh with the bundled head model's landmark embedding, which needs
    the mesh to have the bundled head's topology.
    """
    obj_path = obj_path or DEFAULT_OBJ
    if not lms_cond:
        return load_condition(obj_path, None, landmarks_fn=bundled_landmarks)
    if lms_path is None:
        if obj_path != DEFAULT_OBJ:
            raise ValueError(f'{obj_path}: --lms_cond needs --lms_path (the 68 x 3 landmarks of this mesh)')
        lms_path = DEFAULT_LMS
    return load_condition(obj_path, lms_path)


def mesh_condition(G, v: torch.Tensor, obj_path: str = None, device=torch.device('cpu')):
    """A `read_mesh_condition` result for G, on `device`; None for EG3D. Another vertex count is an error naming obj_path."""
    if not uses_mesh(G):
        return None
    if v.shape[1] != G.num_vertices + NUM_LANDMARKS:
        raise ValueError(f'{obj_path or DEFAULT_OBJ}: expected {G.num_vertices} vertices (the generator\'s mesh), '
                         f'found {v.shape[1] - NUM_LANDMARKS}')
    return v.to(device)


@functools.lru_cache(maxsize=1)
def _bundled_head():
    from training.mesh.head_model import load_head_model
    return load_head_model()


def bundled_landmarks(verts: torch.Tensor) -> torch.Tensor:
    """(1, V, 3) mesh of the bundled head's topology -> (1, 68, 3) landmarks by its embedding."""
    head = _bundled_head()
    expected = head.v_template.shape[0]
    if verts.shape[1] != expected:
        raise ValueError(f'computing landmarks from a mesh needs the bundled head topology ({expected} vertices), '
                         f'got {verts.shape[1]}: pass --lms_path and --lms_cond=True')
    with torch.no_grad():
        return head.landmarks(verts)


def orbit_label(G, yaw: float, pitch: float, focal: float = coords.FOCAL_LENGTH, device=torch.device('cpu')) -> torch.Tensor:
    """(1, 25) label of a camera on G's orbit (radius and pivot from its rendering options)."""
    rk = G.rendering_kwargs
    cam2world = coords.cam2world_look_at(torch.tensor([yaw]), torch.tensor([pitch]),
                                         radius=rk.get('avg_camera_radius', coords.CAMERA_RADIUS),
                                         pivot=tuple(rk.get('avg_camera_pivot', coords.CAMERA_PIVOT)))
    return coords.make_label(cam2world, coords.intrinsics(focal)).to(device)


def frontal_label(G, focal: float = coords.FOCAL_LENGTH, device=torch.device('cpu')) -> torch.Tensor:
    return orbit_label(G, np.pi / 2, np.pi / 2, focal, device)


def to_uint8(images: torch.Tensor, drange=(-1, 1)) -> np.ndarray:
    """(N, C, H, W) float in drange -> (N, H, W, 3) uint8 (1 channel is repeated)."""
    lo, hi = drange
    x = ((images.detach().float() - lo) * (255 / (hi - lo))).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def depth_to_image(depth: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) depth -> (N, 1, H, W) in [-1, 1], near = bright, per-image min-max."""
    d = -depth
    lo = d.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = d.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return (d - lo) / (hi - lo).clamp(min=1e-8) * 2 - 1


def make_grid(frames: np.ndarray, grid: tuple) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (gh*H, gw*W, 3) image, row-major; N must equal gw*gh."""
    gw, gh = grid
    n, h, w, c = frames.shape
    if n != gw * gh:
        raise ValueError(f'{n} images do not fill a {gw}x{gh} grid')
    return frames.reshape(gh, gw, h, w, c).transpose(0, 2, 1, 3, 4).reshape(gh * h, gw * w, c)


def save_image_grid(images: torch.Tensor, path: str, grid: tuple, drange=(-1, 1)):
    """Atomically save (N, C, H, W) images as one PNG grid (gw columns x gh rows)."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(make_grid(to_uint8(images, drange), grid)).save(buffer, format='PNG')
    atomic_write_bytes(path, buffer.getvalue())
