"""Coordinate conventions, defined once. Every other module imports them from here.

Spaces
------
mesh   FLAME canonical space in metres: +x the subject's left, +y up, +z out of the face.
       Global head rotation removed (it lives in the camera).
world  The tri-plane box is the cube [-box_warp/2, box_warp/2]^3 (box_warp = 1).
       world = MESH_TO_WORLD_SCALE * (mesh + MESH_SHIFT): the orthographic views map
       +-0.2 m of mesh to NDC +-1, i.e. to +-0.5 world units.
camera OpenCV: x right, y down, z forward (into the scene). Labels are 25 floats:
       row-major 4x4 cam2world followed by row-major 3x3 intrinsics normalised by the
       image size (focal 4.2647 and principal point 0.5 for FFHQ).
ndc    What the rasterizer takes: x in [-1, 1] left to right (columns), y in [-1, 1] top
       to bottom (rows), z = depth along the viewing direction (smaller is nearer).
       This is grid_sample's convention (align_corners=False: pixel centres at
       (2i + 1) / n - 1), and for a perspective camera it is the OpenCV image plane.

Tri-plane axes
--------------
A plane is named by the two world axes that its (u, v) = (column, row) coordinates
follow. grid_sample(plane, [u, v]) with u = 2 * world[a] / box_warp, v = 2 * world[b] / box_warp.
"""

import math

import torch

from torch_utils import misc

# --- Camera (FFHQ as processed by EG3D) -------------------------------------------------
FOCAL_LENGTH = 4.2647                    # normalised by image size
FOV_DEG = 18.837                         # EG3D's --fov-deg for FFHQ (see fov_to_focal)
PRINCIPAL_POINT = (0.5, 0.5)
CAMERA_RADIUS = 2.7
CAMERA_PIVOT = (0.0, 0.0, 0.2)           # look-at point, world units
RAY_START = 2.25
RAY_END = 3.3
BOX_WARP = 1.0

# --- Mesh to world ------------------------------------------------------------------------
ORTHO_SCALE = 5.0                        # mesh metres -> NDC of the orthographic views
MESH_SHIFT = (0.0, -0.01, -0.01)         # metres, added before scaling
MESH_TO_WORLD_SCALE = ORTHO_SCALE * BOX_WARP / 2   # = 2.5

# --- Tri-plane layouts --------------------------------------------------------------------
# Each entry: (column axis, row axis) of a plane, 0 = x, 1 = y, 2 = z.
PLANE_AXES = {
    'next3d': ((0, 1), (0, 2), (2, 1)),  # (x, y), (x, z), (z, y): default for new models
    'eg3d':   ((0, 1), (0, 2), (2, 0)),  # (x, y), (x, z), (z, x): EG3D's official weights
}

# --- Landmarks -----------------------------------------------------------------------------
# iBUG 68-point index of each point's mirror partner (jaw, brows, nose bridge, nostrils,
# eyes, outer lips, inner lips): point i of a mirrored face is point LANDMARK_MIRROR[i] of
# the original with x negated.
LANDMARK_MIRROR = (list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30]
                   + [35, 34, 33, 32, 31] + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40]
                   + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])

# --- Orthographic views of the texture rasterization (Euler degrees, R = Rz Ry Rx) --------
ORTHO_VIEWS_DEG = {
    'front': (0.0, 0.0, 0.0),
    'left':  (0.0, 90.0, 0.0),           # yaw +90
    'right': (0.0, -90.0, 0.0),          # yaw -90
    'top':   (90.0, 0.0, 0.0),
}


def fov_to_focal(fov_deg: float) -> float:
    """Normalised focal length for EG3D's `--fov-deg`: 1 / (sqrt(2) tan(fov / 2)).

    EG3D measures its FOV with a sqrt(2) factor, so 18.837 deg gives 4.262 (the FFHQ
    labels' 4.2647 to 0.1%). Kept so published commands give the published images.
    """
    return 1.0 / (math.sqrt(2) * math.tan(math.radians(float(fov_deg)) / 2))


def intrinsics(focal: float = FOCAL_LENGTH, cx: float = PRINCIPAL_POINT[0], cy: float = PRINCIPAL_POINT[1]) -> torch.Tensor:
    """(3, 3) normalised intrinsics."""
    return torch.tensor([[focal, 0, cx], [0, focal, cy], [0, 0, 1]], dtype=torch.float32)


def euler_to_matrix(angles_deg: torch.Tensor) -> torch.Tensor:
    """Rotation matrices R = Rz @ Ry @ Rx from Euler angles (..., 3) = (x, y, z) in degrees."""
    a = torch.deg2rad(torch.as_tensor(angles_deg, dtype=torch.float32))
    cx, cy, cz = torch.cos(a).unbind(-1)
    sx, sy, sz = torch.sin(a).unbind(-1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).unflatten(-1, (3, 3))
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).unflatten(-1, (3, 3))
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).unflatten(-1, (3, 3))
    return rz @ ry @ rx


def mesh_to_world(points: torch.Tensor) -> torch.Tensor:
    """(..., 3) canonical mesh metres -> (..., 3) world units of the tri-plane box."""
    shift = torch.tensor(MESH_SHIFT, dtype=points.dtype, device=points.device)
    return (points + shift) * MESH_TO_WORLD_SCALE


def world_to_mesh(points: torch.Tensor) -> torch.Tensor:
    """Inverse of mesh_to_world."""
    shift = torch.tensor(MESH_SHIFT, dtype=points.dtype, device=points.device)
    return points / MESH_TO_WORLD_SCALE - shift


def project_onto_planes(coords: torch.Tensor, plane_axes: str = 'next3d', box_warp: float = BOX_WARP) -> torch.Tensor:
    """World points (B, N, 3) -> grid_sample coordinates (B, 3, N, 2) on the three planes.

    A view of the points-first (B, N, 3, 2) gather (one pass; the layout that
    ops.bilinear_mean's CPU path reads)."""
    if (coords.device.type == 'cpu' and coords.dtype in (torch.float32, torch.float64) and not misc.records_graph(coords)
            and not torch.compiler.is_compiling()):
        # On the CPU without a graph to record, a product with a (3, 6) matrix of zeros and
        # 2 / box_warp: 5x faster than the gather of 3-wide rows (98,304 points: 0.17
        # against 0.86 ms), the same values for finite points (one rounded product each,
        # plus exact zeros); a non-finite coordinate makes all of its point's coordinates
        # NaN. (Its backward would add zero terms into the points' gradient.)
        selection = misc.device_constant(f'coords.plane_selection.{plane_axes}.{box_warp}.{coords.dtype}', coords.device,
                                         lambda d: _plane_selection(plane_axes, box_warp, coords.dtype, d))
        gathered = coords @ selection
    else:
        axes = misc.device_constant(f'coords.plane_axes.{plane_axes}', coords.device,
                                    lambda d: torch.tensor(PLANE_AXES[plane_axes], device=d).reshape(-1))
        # index_select (not [..., axes]): ~4x faster on the CPU, the same values.
        gathered = (coords * (2 / box_warp)).index_select(-1, axes)
    return gathered.view(*coords.shape[:-1], 3, 2).permute(0, 2, 1, 3)


def _plane_selection(plane_axes: str, box_warp: float, dtype: torch.dtype, device) -> torch.Tensor:
    """(3, 6) matrix: column 2p + k holds 2 / box_warp in the row of plane p's axis k (made
    without writes into it: misc.device_constant remakes a tensor that was written into)."""
    columns = [a for pair in PLANE_AXES[plane_axes] for a in pair]
    rows = [[2 / box_warp if axis == row else 0.0 for axis in columns] for row in range(3)]
    return torch.tensor(rows, dtype=dtype, device=device)


def cam2world_look_at(yaw: torch.Tensor, pitch: torch.Tensor, radius: float = CAMERA_RADIUS,
                      pivot=CAMERA_PIVOT) -> torch.Tensor:
    """OpenCV cam2world (B, 4, 4) for cameras on a sphere around `pivot`, looking at it.

    EG3D's orbit angles: yaw = horizontal angle, pi/2 is frontal; pitch = polar angle from
    +y, pi/2 is level. A frontal camera sits at pivot + (0, 0, radius).
    """
    yaw, pitch = torch.as_tensor(yaw, dtype=torch.float32).reshape(-1), torch.as_tensor(pitch, dtype=torch.float32).reshape(-1)
    pitch = pitch.clamp(1e-5, math.pi - 1e-5)
    pivot = torch.tensor(pivot, dtype=torch.float32)
    origin = torch.stack([
        radius * torch.sin(pitch) * torch.cos(math.pi - yaw),
        radius * torch.cos(pitch),
        radius * torch.sin(pitch) * torch.sin(math.pi - yaw),
    ], -1) + pivot
    forward = torch.nn.functional.normalize(pivot - origin, dim=-1)
    world_up = torch.tensor([0.0, 1.0, 0.0]).expand_as(forward)
    right = torch.nn.functional.normalize(torch.cross(forward, world_up, dim=-1), dim=-1)
    down = torch.cross(forward, right, dim=-1)
    m = torch.eye(4).repeat(len(yaw), 1, 1)
    m[:, :3, 0], m[:, :3, 1], m[:, :3, 2], m[:, :3, 3] = right, down, forward, origin
    return m


def make_label(cam2world: torch.Tensor, intr: torch.Tensor = None) -> torch.Tensor:
    """(B, 4, 4) cam2world [+ (3, 3) or (B, 3, 3) intrinsics] -> (B, 25) camera labels."""
    intr = intrinsics() if intr is None else intr
    intr = intr.to(cam2world).expand(len(cam2world), 3, 3)
    return torch.cat([cam2world.reshape(-1, 16), intr.reshape(-1, 9)], dim=1)


def split_label(c: torch.Tensor):
    """(B, 25+) labels -> cam2world (B, 4, 4), intrinsics (B, 3, 3)."""
    return c[:, :16].reshape(-1, 4, 4), c[:, 16:25].reshape(-1, 3, 3)
