"""Builds the project's procedural head model in FLAME's file formats.

    python dataset_preprocessing/head_model/make_head_model.py --outdir data/head_model

Deterministic (pure numpy, no randomness): the same code writes the same bytes.

Geometry
--------
FLAME canonical space in metres: +x the subject's left, +y up, +z out of the face; the
origin near the head centre between the ears. The surface is star-shaped around
CENTRE: every vertex is CENTRE + r(theta, phi) * dir(theta, phi), with theta the azimuth
around +y (0 = facing +z, positive towards +x) and phi the polar angle from +y. The
radius is a smooth union of three convex primitives (cranium, face, neck), plus radial
bumps and dents for the brow ridge, eye sockets, nose, cheeks, lips, chin and ears.
Being star-shaped, the surface cannot self-intersect, and landmarks are embedded by
casting rays from CENTRE.

The grid has N_COLS columns (denser at the front) and N_ROWS rows (denser on the face),
closed at the crown by one pole vertex and open at the neck. Two rows meet at the mouth:
between the mouth corners their faces are left out, so the upper lip (rows above,
skinned to the head) and the lower lip (rows below, skinned to the jaw) are separate
surface regions that touch at rest; the two corner vertices are shared. Rotating the
jaw joint opens a hole into the head; the inside of the head is back-facing from the
front, so a front view shows the background through the mouth, like FLAME.
Two UV-sphere eyeballs sit in the eye sockets, skinned to the eye joints.

Files written (FLAME/DECA layouts)
----------------------------------
generic_model.pkl      plain pickle of a dict of float32/int64 numpy arrays
head_template.obj      v, vt, f with v/vt indices (vt has seams: T != V)
landmark_embedding.npy np.save'd dict: full_lmk_faces_idx (1,68), full_lmk_bary_coords
                       (1,68,3), static_* (51 points) and dynamic_* (79 yaw bins x 17)
uv_face_eye_mask.png   256x256, white = face and eye texture region
neutral.obj, neutral_lms.txt   the neutral mesh and its 68 landmarks (68x3)
README.md
"""

import io
import os
import pickle
import sys

import click
import numpy as np

if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from torch_utils.persistence import atomic_write_bytes  # noqa: E402
from training.mesh.obj_io import write_landmarks, write_obj  # noqa: E402

# --- Layout constants (metres, radians) -----------------------------------------------------
CENTRE = np.array([0.0, 0.0, -0.015])   # star centre of the surface
N_COLS = 78                              # columns around the head (even: symmetric, one at theta=0)
N_ROWS = 62                              # rows from the crown pole (row 0) to the neck
PHI_MAX_DEG = 162.0                       # last row: the neck cut, about y = -0.17
PHI_MAX = np.deg2rad(PHI_MAX_DEG)
PHI_MOUTH = np.deg2rad(115.5)            # the mouth line
COL_FRONT_DENSITY = 0.35                 # theta = pi (a u + (1 - a) u^3): a < 1 packs columns at the front
MOUTH_HALF_COLS = 8                      # columns from the mouth centre to each corner
LIP_SET_BACK = 0.003                     # how far the lips' meeting line lies behind the lips' front
EYE_CENTRE = np.array([0.032, 0.024])    # (x, y) of the left eye (+x); the right eye is mirrored
EYE_OPENING = (0.0130, 0.0055)           # half width and half height of the eye opening
EYEBALL_RADIUS = 0.0120
LID_CLEARANCE = 0.0015                   # lids lie this far behind the eyeball inside the opening
EYEBALL_SEGMENTS = (12, 10)              # longitude segments, latitude rings
N_SHAPE = 12
N_EXP = 12
UV_MASK_SIZE = 256

JOINT_NAMES = ('global', 'neck', 'jaw', 'eye_left', 'eye_right')
KINTREE = np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)


# --- Small helpers -----------------------------------------------------------------------------

def smoothstep(e0, e1, x):
    t = np.clip((np.asarray(x, dtype=np.float64) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def gauss(x, y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def smooth_max(a, b, k):
    """Polynomial smooth maximum with blend width k (metres): a fillet between primitives."""
    h = np.clip(k - np.abs(a - b), 0.0, None) / k
    return np.maximum(a, b) + h * h * k * 0.25


def directions(theta, phi):
    return np.stack([np.sin(phi) * np.sin(theta), np.cos(phi), np.sin(phi) * np.cos(theta)], axis=-1)


def column_theta(n_cols=N_COLS):
    """Azimuth of each column, k = 0 at the back (-pi), k = n_cols / 2 at the front (0)."""
    u = -1 + 2 * np.arange(n_cols) / n_cols
    a = COL_FRONT_DENSITY
    return np.pi * (a * u + (1 - a) * u ** 3), u


def theta_to_u(theta):
    """Inverse of the column warp (for UVs of points between columns), via a dense table."""
    u = np.linspace(-1, 1, 20001)
    a = COL_FRONT_DENSITY
    return np.interp(theta, np.pi * (a * u + (1 - a) * u ** 3), u)


def row_phi():
    """Polar angle of rows 0..N_ROWS-1: dense on the face, the mouth between two rows."""
    phi = np.linspace(0, PHI_MAX, 4001)
    deg = np.rad2deg(phi)
    density = (1.0 + 2.4 * smoothstep(50, 64, deg) * (1 - smoothstep(146, 158, deg))
               + 2.0 * np.exp(-0.5 * ((deg - np.rad2deg(PHI_MOUTH)) / 5.0) ** 2)
               + 3.0 * np.exp(-0.5 * ((deg - 76.5) / 4.0) ** 2))
    cdf = np.concatenate([[0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(phi))])
    s = cdf / cdf[-1] * (N_ROWS - 1)
    # Warp so that the mouth falls exactly half-way between two rows.
    s_m = np.interp(PHI_MOUTH, phi, s)
    i_m = int(np.floor(s_m))
    target = i_m + 0.5
    s_new = np.where(s <= s_m, s * target / s_m, target + (s - s_m) * (N_ROWS - 1 - target) / (N_ROWS - 1 - s_m))
    return np.interp(np.arange(N_ROWS), s_new, phi), i_m


# --- Base shape: a smooth union of convex primitives, measured along rays from CENTRE ----------

def _exit_distance(inside, dirs, t_max=0.4, iters=40):
    """Distance along each ray from CENTRE to where the convex `inside(points)` turns False.

    CENTRE must lie inside the primitive (bisection on [0, t_max] assumes inside at 0).
    """
    lo = np.zeros(dirs.shape[:-1])
    hi = np.full(dirs.shape[:-1], t_max)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ins = inside(CENTRE + mid[..., None] * dirs)
        lo = np.where(ins, mid, lo)
        hi = np.where(ins, hi, mid)
    return 0.5 * (lo + hi)


def _superellipsoid(centre, radii, power):
    def inside(p):
        q = np.abs((p - centre) / radii)
        return (q ** power).sum(-1) < 1.0
    return inside


def _neck(p):
    """Elliptic neck cylinder (0.114 m wide, 0.106 m deep, axis at z = -0.024)."""
    q = (p[..., 0] / 0.057) ** 2 + ((p[..., 2] + 0.024) / 0.053) ** 2
    return (q < 1.0) & (p[..., 1] < 0.02)      # reaches above CENTRE, so rays start inside it


def base_radius(dirs):
    """Radius (...,) of the feature-free head along unit rays `dirs` (..., 3) from CENTRE:
    a smooth union of a cranium and a (boxier) face superellipsoid and the neck."""
    cranium = _exit_distance(_superellipsoid(np.array([0.0, 0.027, -0.013]), np.array([0.077, 0.104, 0.099]), 2.3), dirs)
    face = _exit_distance(_superellipsoid(np.array([0.0, -0.030, 0.004]), np.array([0.061, 0.077, 0.083]), 2.8), dirs)
    neck = _exit_distance(_neck, dirs)
    return smooth_max(smooth_max(cranium, face, 0.012), neck, 0.02)


# --- Features: radial offsets (metres) as functions of the base surface point ----------------

def _front(z):
    return smoothstep(0.0, 0.04, z)


def feature_fields(p):
    """Named radial offset fields (..., ) in metres at base surface points p (..., 3)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    ax = np.abs(x)
    front = _front(z)
    ex, ey = EYE_CENTRE
    hw, hh = EYE_OPENING
    f = {}
    f['brow'] = front * (0.005 * gauss(ax, y, 0.030, 0.044, 0.020, 0.0065) + 0.003 * gauss(x, y, 0, 0.041, 0.010, 0.008))
    f['socket'] = front * -0.006 * gauss(ax, y, ex, ey, 0.017, 0.011)
    q = ((ax - ex) / hw) ** 2 + ((y - ey) / hh) ** 2
    # Inside the opening the lid surface sinks just behind the eyeball sphere (whose front is
    # 0.5 mm behind the closed surface), so the eyeball shows and the lids hug it.
    rho2 = (ax - ex) ** 2 + (y - ey) ** 2
    sphere_depth = 0.0005 + EYEBALL_RADIUS - np.sqrt(np.clip(EYEBALL_RADIUS ** 2 - rho2, 0, None))
    f['eye_opening'] = -front * (sphere_depth + LID_CLEARANCE) * smoothstep(1.1, 0.75, q)
    # Nose: a ridge whose height and width grow from the root to the tip, then fall to the base.
    height = np.interp(y, [-0.034, -0.029, -0.024, -0.017, -0.005, 0.010, 0.022, 0.032], [0, 0.004, 0.017, 0.026, 0.019, 0.010, 0.005, 0])
    width = np.interp(y, [-0.03, -0.017, 0.0, 0.03], [0.010, 0.0095, 0.0065, 0.0055])
    f['nose'] = front * height * np.exp(-0.5 * (x / width) ** 2)
    f['alae'] = front * 0.0065 * gauss(ax, y, 0.015, -0.024, 0.0055, 0.0055)
    f['cheeks'] = front * 0.004 * gauss(ax, y, 0.046, 0.000, 0.015, 0.013)
    return f


def lip_fields(p, y_mouth):
    """Radial offsets of the lips (around the mouth line at height `y_mouth`) and the chin."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    front = _front(z)
    return {
        'upper_lip': front * 0.0050 * gauss(x, y, 0, y_mouth + 0.0055, 0.019, 0.0045),
        'lower_lip': front * 0.0055 * gauss(x, y, 0, y_mouth - 0.0070, 0.016, 0.0050),
        'chin': front * (0.009 * gauss(x, y, 0, -0.089, 0.014, 0.011) - 0.002 * gauss(x, y, 0, y_mouth - 0.019, 0.012, 0.003)),
    }


def ear_field(p):
    """Radial offset of the ears: a helix bump with a concha dent on each side of the head."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    side = smoothstep(0.05, 0.07, np.abs(x))
    helix = gauss(y, z, 0.006, -0.014, 0.017, 0.010)
    concha = gauss(y, z, 0.002, -0.010, 0.006, 0.005)
    return side * (0.014 * helix - 0.006 * concha)


# --- The mesh ------------------------------------------------------------------------------------

def build_surface():
    """Head surface grid: positions, faces, UVs, the mouth rows and per-vertex grid indices."""
    theta, u_col = column_theta()
    phis, i_m = row_phi()
    k_front = N_COLS // 2
    span = np.arange(k_front - MOUTH_HALF_COLS, k_front + MOUTH_HALF_COLS + 1)
    # Per (row, column) polar angle: the two mouth rows meet at PHI_MOUTH across the mouth and
    # relax back to their own rows over three columns beyond each corner.
    phi_grid = np.repeat(phis[:, None], N_COLS, axis=1)
    dist_out = np.maximum(np.abs(np.arange(N_COLS) - k_front) - MOUTH_HALF_COLS, 0)
    snap = np.clip(1 - dist_out / 3.0, 0, 1)
    for row in (i_m, i_m + 1):
        phi_grid[row] = phis[row] + snap * (PHI_MOUTH - phis[row])
    theta_grid = np.repeat(theta[None], N_ROWS, axis=0)
    dirs = directions(theta_grid, phi_grid)
    r0 = base_radius(dirs)
    p0 = CENTRE + r0[..., None] * dirs
    feats = feature_fields(p0)
    y_mouth = float(p0[i_m, k_front, 1])
    feats.update(lip_fields(p0, y_mouth))
    feats['ears'] = ear_field(p0)
    r = r0 + sum(feats.values())
    # The lips' meeting line lies behind their fronts (the lips roll inwards).
    in_span = np.clip(1 - (np.abs(np.arange(N_COLS) - k_front) / (MOUTH_HALF_COLS + 0.5)) ** 2, 0, 1) * (dist_out == 0)
    for row in (i_m, i_m + 1):
        r[row] -= LIP_SET_BACK * np.sqrt(in_span)
    pos = CENTRE + r[..., None] * dirs

    # Vertex indices: the pole, then rows 1.. row-major; the corner vertices of the lower mouth
    # row are the upper row's.
    index = np.full([N_ROWS, N_COLS], -1, dtype=np.int64)
    index[0, :] = 0
    index[1:] = 1 + np.arange((N_ROWS - 1) * N_COLS).reshape(N_ROWS - 1, N_COLS)
    index[i_m + 1, span[[0, -1]]] = index[i_m, span[[0, -1]]]
    verts = np.zeros([1 + (N_ROWS - 1) * N_COLS, 3])
    verts[index[1:].reshape(-1)] = pos[1:].reshape(-1, 3)
    verts[0] = CENTRE + base_radius(np.array([0.0, 1.0, 0.0])) * np.array([0.0, 1.0, 0.0])

    # Texture coordinates: column k -> u = k / N_COLS (column N_COLS repeats column 0 at u = 1,
    # the seam at the back of the head); row i -> v = 1 - i / (N_ROWS - 1). The pole gets one
    # uv per fan triangle.
    uv_index = np.arange(N_ROWS * (N_COLS + 1)).reshape(N_ROWS, N_COLS + 1)
    uu, vv = np.meshgrid(np.arange(N_COLS + 1) / N_COLS, 1 - np.arange(N_ROWS) / (N_ROWS - 1))
    uvs = np.stack([uu, vv], -1).reshape(-1, 2)
    uvs[uv_index[0, :N_COLS]] = np.stack([(np.arange(N_COLS) + 0.5) / N_COLS, np.ones(N_COLS)], -1)

    faces, uv_faces = [], []
    for c in range(N_COLS):
        c1 = (c + 1) % N_COLS
        faces.append([index[0, c], index[1, c], index[1, c1]])
        uv_faces.append([uv_index[0, c], uv_index[1, c], uv_index[1, c + 1]])
    slit = set(span[:-1].tolist())
    for i in range(1, N_ROWS - 1):
        for c in range(N_COLS):
            if i == i_m and c in slit:
                continue
            c1 = (c + 1) % N_COLS
            a, b, cc, d = index[i, c], index[i, c1], index[i + 1, c1], index[i + 1, c]
            ua, ub, uc, ud = uv_index[i, c], uv_index[i, c + 1], uv_index[i + 1, c + 1], uv_index[i + 1, c]
            for tri, uvtri in (((a, d, cc), (ua, ud, uc)), ((a, cc, b), (ua, uc, ub))):
                if len(set(tri)) == 3:
                    faces.append(list(tri))
                    uv_faces.append(list(uvtri))
    # Drop the vertices that the corner merge left unused and renumber.
    faces = np.array(faces, dtype=np.int64)
    used = np.zeros(len(verts), dtype=bool)
    used[faces.reshape(-1)] = True
    renumber = np.cumsum(used) - 1
    verts, faces, index = verts[used], renumber[faces], renumber[index]
    info = dict(index=index, uv_index=uv_index, i_mouth=i_m, span=span, theta=theta, u_col=u_col,
                phis=phis, y_mouth=y_mouth, feats=feats, p0=p0, dirs=dirs)
    return verts, faces, uvs, np.array(uv_faces, dtype=np.int64), info


def eyeball(centre, radius):
    """UV sphere around `centre` with its poles on the z axis: (V, 3) positions, (F, 3) faces."""
    n_lon, n_lat = EYEBALL_SEGMENTS
    lat = np.pi * np.arange(1, n_lat) / n_lat                 # from the front pole (+z)
    lon = 2 * np.pi * np.arange(n_lon) / n_lon
    la, lo = np.meshgrid(lat, lon, indexing='ij')
    ring = np.stack([np.sin(la) * np.cos(lo), np.sin(la) * np.sin(lo), np.cos(la)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 0, 1]], ring, [[0, 0, -1]]]) * radius + centre
    faces = []
    ring_index = 1 + np.arange((n_lat - 1) * n_lon).reshape(n_lat - 1, n_lon)
    back = len(verts) - 1
    for j in range(n_lon):
        j1 = (j + 1) % n_lon
        faces.append([0, ring_index[0, j], ring_index[0, j1]])
        for i in range(n_lat - 2):
            a, b, c, d = ring_index[i, j], ring_index[i, j1], ring_index[i + 1, j1], ring_index[i + 1, j]
            faces += [[a, d, c], [a, c, b]]
        faces.append([back, ring_index[-1, j1], ring_index[-1, j]])
    faces = np.array(faces, dtype=np.int64)
    # Orient outwards (the ring order above depends on the handedness of (lat, lon)).
    tri = verts[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    if (np.einsum('ij,ij->i', normal, tri.mean(1) - centre) < 0).mean() > 0.5:
        faces = faces[:, [0, 2, 1]]
    return verts, faces


def surface_point(dirs):
    """(N, 3) surface points along rays `dirs` (N, 3) from CENTRE, without the eye openings."""
    r0 = base_radius(dirs)
    p0 = CENTRE + r0[..., None] * dirs
    feats = feature_fields(p0)
    feats.pop('eye_opening')
    return CENTRE + (r0 + sum(feats.values()))[..., None] * dirs


# --- Ray casting for landmarks -----------------------------------------------------------------

def cast_rays(origins, dirs, verts, faces):
    """First hit of each ray with the mesh: (face index (N,), barycentrics (N, 3)).

    Moller-Trumbore against all faces; rays that hit nothing raise ValueError.
    """
    a, b, c = (verts[faces[:, k]] for k in range(3))
    e1, e2 = b - a, c - a
    out_f, out_b = [], []
    for o, d in zip(origins, dirs):
        pvec = np.cross(d, e2)
        det = np.einsum('ij,ij->i', e1, pvec)
        ok = np.abs(det) > 1e-14
        inv = np.where(ok, 1 / np.where(ok, det, 1), 0)
        tvec = o - a
        u = np.einsum('ij,ij->i', tvec, pvec) * inv
        qvec = np.cross(tvec, e1)
        v = (qvec @ d) * inv
        t = np.einsum('ij,ij->i', e2, qvec) * inv
        hit = ok & (u >= -1e-9) & (v >= -1e-9) & (u + v <= 1 + 1e-9) & (t > 0)
        if not hit.any():
            raise ValueError(f'landmark ray from {o} along {d} hits no face')
        k = np.flatnonzero(hit)[np.argmin(t[hit])]
        out_f.append(k)
        out_b.append([1 - u[k] - v[k], u[k], v[k]])
    return np.array(out_f, dtype=np.int64), np.clip(np.array(out_b), 0, 1)


def _vertex_embedding(vertex, faces, allowed_rows_faces):
    """A face containing `vertex` (among `allowed_rows_faces`) and barycentrics putting it there."""
    cand = np.flatnonzero((faces[allowed_rows_faces] == vertex).any(1))
    k = np.flatnonzero(allowed_rows_faces)[cand[0]]
    bary = (faces[k] == vertex).astype(np.float64)
    return k, bary


def landmark_targets(y_mouth, x_corner):
    """(68, 2) target (x, y) of the iBUG points on the front; index 60-67 are set from vertices."""
    contour_right = [(-0.071, 0.012), (-0.070, -0.004), (-0.068, -0.021), (-0.064, -0.038), (-0.058, -0.055),
                     (-0.049, -0.071), (-0.037, -0.085), (-0.020, -0.097), (0.0, -0.102)]
    contour = contour_right + [(-x, y) for x, y in contour_right[-2::-1]]
    brow_right = [(-0.052, 0.037), (-0.044, 0.0435), (-0.035, 0.046), (-0.025, 0.0455), (-0.015, 0.042)]
    brows = brow_right + [(-x, y) for x, y in brow_right[::-1]]
    nose = [(0, 0.024), (0, 0.012), (0, 0.000), (0, -0.0165),
            (-0.0125, -0.0275), (-0.0065, -0.0295), (0, -0.0305), (0.0065, -0.0295), (0.0125, -0.0275)]
    ex, ey = EYE_CENTRE
    hw, hh = EYE_OPENING
    lid = 0.93 * hh
    eye_r = [(-ex - 0.97 * hw, ey), (-ex - 0.33 * hw, ey + lid), (-ex + 0.33 * hw, ey + lid), (-ex + 0.97 * hw, ey),
             (-ex + 0.33 * hw, ey - lid), (-ex - 0.33 * hw, ey - lid)]
    eye_l = [(ex - 0.97 * hw, ey), (ex - 0.33 * hw, ey + lid), (ex + 0.33 * hw, ey + lid), (ex + 0.97 * hw, ey),
             (ex + 0.33 * hw, ey - lid), (ex - 0.33 * hw, ey - lid)]
    xc, ym = x_corner, y_mouth
    outer = [(-xc - 0.001, ym), (-0.62 * xc, ym + 0.0075), (-0.25 * xc, ym + 0.0095), (0, ym + 0.0085),
             (0.25 * xc, ym + 0.0095), (0.62 * xc, ym + 0.0075), (xc + 0.001, ym),
             (0.62 * xc, ym - 0.0090), (0.25 * xc, ym - 0.0120), (0, ym - 0.0125), (-0.25 * xc, ym - 0.0120), (-0.62 * xc, ym - 0.0090)]
    inner = [(0, 0)] * 8
    return np.array(contour + brows + nose + eye_r + eye_l + outer + inner, dtype=np.float64)


def embed_landmarks(verts, faces, n_head_faces, info):
    """68 iBUG landmarks as (face index (68,), barycentrics (68, 3)) on the neutral mesh."""
    index, i_m, span = info['index'], info['i_mouth'], info['span']
    x_corner = float(verts[index[i_m, span[-1]], 0])
    targets = landmark_targets(info['y_mouth'], x_corner)
    head_v, head_f = verts, faces[:n_head_faces]
    face_idx = np.zeros(68, dtype=np.int64)
    bary = np.zeros([68, 3])
    # Rays from CENTRE towards the target (x, y); the target depth is refined once from the hit.
    z_guess = np.full(len(targets), 0.09)
    for _ in range(3):
        p = np.concatenate([targets, z_guess[:, None]], 1)
        d = p - CENTRE
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        fi, bc = cast_rays(np.repeat(CENTRE[None], 60, 0), d[:60], head_v, head_f)
        hit = np.einsum('nk,nkj->nj', bc, head_v[head_f[fi]])
        z_guess[:60] = hit[:, 2]
    face_idx[:60], bary[:60] = fi, bc
    # Inner lips: vertices of the two mouth rows; the upper ones embedded in faces above the slit.
    row_of = np.full(len(verts), -1)
    row_of[index[1:].reshape(-1)] = np.repeat(np.arange(1, N_ROWS), N_COLS)
    row_of[index[i_m, span[[0, -1]]]] = i_m
    upper_faces = np.zeros(len(faces), dtype=bool)
    upper_faces[:n_head_faces] = (row_of[faces[:n_head_faces]] <= i_m).all(1) & (row_of[faces[:n_head_faces]] >= 1).all(1)
    lower_faces = np.zeros(len(faces), dtype=bool)
    lower_faces[:n_head_faces] = (row_of[faces[:n_head_faces]] >= i_m).all(1) & \
        ~((row_of[faces[:n_head_faces]] == i_m).all(1))
    k0 = N_COLS // 2
    q = MOUTH_HALF_COLS // 2
    inner = [(index[i_m, span[0]], upper_faces), (index[i_m, k0 - q], upper_faces), (index[i_m, k0], upper_faces),
             (index[i_m, k0 + q], upper_faces), (index[i_m, span[-1]], upper_faces),
             (index[i_m + 1, k0 + q], lower_faces), (index[i_m + 1, k0], lower_faces), (index[i_m + 1, k0 - q], lower_faces)]
    for n, (vertex, allowed) in enumerate(inner):
        face_idx[60 + n], bary[60 + n] = _vertex_embedding(vertex, faces, allowed)
    return face_idx, bary


# --- Skinning, joints, blendshapes --------------------------------------------------------------

def skinning_weights(verts, n_head, info, eye_slices):
    """(V, 5) weights over (global, neck, jaw, eye_left, eye_right)."""
    index, i_m, span = info['index'], info['i_mouth'], info['span']
    k0 = N_COLS // 2
    w = np.zeros([len(verts), 5])
    rows = np.repeat(np.arange(N_ROWS)[:, None], N_COLS, 1)
    cols = np.repeat(np.arange(N_COLS)[None], N_ROWS, 0)
    theta = np.repeat(info['theta'][None], N_ROWS, 0)
    phi = np.repeat(info['phis'][:, None], N_COLS, 1)
    # Jaw: a step across the mouth line between the corners, widening beyond them, fading
    # towards the ears and down the neck.
    beyond = np.maximum(np.abs(cols - k0) - MOUTH_HALF_COLS, 0)
    half_width = 0.5 + 1.3 * beyond
    s = rows - (i_m + 0.5)
    vertical = smoothstep(0, 1, 0.5 + s / (2 * half_width))
    lateral = 1 - smoothstep(np.deg2rad(50), np.deg2rad(95), np.abs(theta))
    down = 1 - smoothstep(np.deg2rad(135), np.deg2rad(PHI_MAX_DEG), phi)
    jaw = vertical * lateral * down
    pos = verts[index]
    root = smoothstep(-0.085, -0.135, pos[..., 1]) * (1 - jaw)
    grid_w = np.stack([root, 1 - root - jaw, jaw], -1)
    # Shared corner vertices: half jaw, half head, so the corners stay together.
    for c in span[[0, -1]]:
        grid_w[i_m, c] = [0, 0.5, 0.5]
        grid_w[i_m + 1, c] = [0, 0.5, 0.5]
    w[index[1:].reshape(-1), :3] = grid_w[1:].reshape(-1, 3)
    w[index[i_m, span[[0, -1]]], :3] = [0, 0.5, 0.5]
    w[0, 1] = 1.0
    w[eye_slices[0], 3] = 1.0
    w[eye_slices[1], 4] = 1.0
    w[w < 1e-3] = 0.0             # no negligible influences: a joint moves a vertex or it does not
    return w / w.sum(1, keepdims=True)


def joint_regressor(verts, info, eye_slices):
    """(5, V): each joint is the mean of a few vertices (so joints follow identity shape)."""
    index = info['index']
    J = np.zeros([5, len(verts)])
    ring_y = verts[index[1:]][..., 1].mean(1)
    for j, y in ((0, -0.135), (1, -0.075)):
        row = 1 + int(np.argmin(np.abs(ring_y - y)))
        J[j, index[row]] = 1.0 / N_COLS
    # Jaw: the mean of the two vertices in front of the ears nearest the jaw hinge (mirrored pair).
    theta = info['theta']
    target = np.array([0.068, -0.024, 0.0])
    k_left = int(np.argmin(np.abs(theta - np.deg2rad(82))))
    k_right = N_COLS - k_left
    rows = verts[index[1:, k_left]]
    row = 1 + int(np.argmin(np.linalg.norm(rows[:, 1:] - target[1:], axis=1)))
    J[2, index[row, k_left]] = 0.5
    J[2, index[row, k_right]] = 0.5
    for j, sl in zip((3, 4), eye_slices):
        J[j, sl] = 1.0 / (sl.stop - sl.start)
    return J


def blendshapes(verts, n_head, info, eye_slices, lower_side):
    """Identity and expression displacement fields: (V, 3, N_SHAPE), (V, 3, N_EXP) metres.

    A coefficient of 1 is about one standard deviation for identity and a moderate
    expression; the fields are smooth functions of the neutral position, so the touching
    lips move together unless a field uses `lower_side` (1 on the jaw side of the mouth).
    Eyeballs move rigidly with their socket rims.
    """
    p = verts.copy()
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    ax, sx = np.abs(x), np.sign(x)
    radial = (p - CENTRE) / np.linalg.norm(p - CENTRE, axis=1, keepdims=True)
    head = smoothstep(-0.14, -0.09, y)
    front = _front(z)
    feats = feature_fields(info['p0_all'])
    lips = lip_fields(info['p0_all'], info['y_mouth'])
    ym = info['y_mouth']
    xc = info['x_corner']
    ex, ey = EYE_CENTRE
    zero = np.zeros_like(x)

    def vec(dx=zero, dy=zero, dz=zero):
        return np.stack([dx + zero, dy + zero, dz + zero], -1)

    corners = gauss(ax, y, xc, ym, 0.011, 0.009) * front
    mouth = gauss(x, y, 0, ym, 0.024, 0.011) * front
    shape = [
        vec(dx=0.005 * x / 0.077 * head),                                                  # head width
        vec(dy=0.006 * np.clip(y / 0.125, 0, 1)),                                          # cranium height
        vec(dz=0.006 * np.clip(-(z + 0.015) / 0.1, 0, 1) * head),                          # head depth
        vec(dy=-0.005 * np.clip((0.02 - y) / 0.12, 0, 1) * front * head),                  # face length
        vec(dx=0.005 * x / 0.06 * smoothstep(-0.01, -0.05, y) * head),                    # jaw width
        0.35 * feats['nose'][:, None] * radial,                                            # nose size
        vec(dx=0.0025 * x / 0.01 * gauss(x, y, 0, -0.02, 0.014, 0.012) * front),           # nose width
        (0.45 * lips['chin'] * (lips['chin'] > 0))[:, None] * radial,                    # chin
        0.6 * feats['brow'][:, None] * radial,                                             # brow ridge
        vec(dx=0.002 * sx * gauss(ax, y, ex, ey, 0.016, 0.014) * front),                   # eye spacing
        0.4 * (lips['upper_lip'] + lips['lower_lip'])[:, None] * radial,                   # lip fullness
        0.005 * gauss(ax, y, 0.048, -0.02, 0.018, 0.018)[:, None] * front[:, None] * radial,  # cheek fullness
    ]
    # Blink: undo the eye opening and bring the lid 1.5 mm further out, one side at a time.
    opening = feats['eye_opening']
    blink = lambda side: -opening * (side * x > 0) + 0.0015 * front * smoothstep(
        1.4, 0.6, ((x - side * ex) / EYE_OPENING[0]) ** 2 + ((y - ey) / EYE_OPENING[1]) ** 2)
    upper_lip = gauss(x, y, 0, ym + 0.004, 0.02, 0.007) * front * (1 - lower_side)
    lower_lip = gauss(x, y, 0, ym - 0.005, 0.018, 0.008) * front * lower_side
    brows = gauss(ax, y, 0.033, 0.045, 0.022, 0.012) * front
    expression = [
        vec(dx=0.004 * sx * corners, dy=0.006 * corners + 0.002 * gauss(ax, y, 0.045, -0.01, 0.015, 0.012) * front,
            dz=-0.003 * corners),                                                          # smile
        vec(dy=0.006 * brows * smoothstep(0.0, 0.03, y)),                                  # brow raise
        vec(dx=-0.002 * sx * gauss(ax, y, 0.016, 0.042, 0.01, 0.01) * front,
            dy=-0.003 * gauss(ax, y, 0.016, 0.042, 0.012, 0.01) * front),                   # brow furrow
        vec(dx=-0.3 * x * mouth, dz=0.006 * mouth),                                        # lip pucker
        blink(+1)[:, None] * radial,                                                       # blink left (+x)
        blink(-1)[:, None] * radial,                                                       # blink right (-x)
        vec(dx=0.005 * sx * corners, dz=-0.002 * corners),                                 # mouth stretch
        vec(dy=0.003 * upper_lip, dz=0.001 * upper_lip),                                   # upper lip raise
        vec(dy=-0.003 * lower_lip, dz=0.001 * lower_lip),                                  # lower lip depress
        0.006 * gauss(ax, y, 0.045, -0.035, 0.016, 0.016)[:, None] * front[:, None] * radial,  # cheek puff
        vec(dy=0.002 * gauss(ax, y, 0.012, -0.005, 0.008, 0.015) * front,
            dz=-0.001 * gauss(ax, y, 0.012, -0.005, 0.008, 0.015) * front),               # nose wrinkle
        vec(dy=-0.004 * corners),                                                          # frown (corners down)
    ]
    out = []
    for fields in (shape, expression):
        d = np.stack(fields, -1)                                                           # (V, 3, K)
        for side, sl in zip((+1, -1), eye_slices):
            # Rigid eyeballs: the mean displacement of the socket rim around the eye opening,
            # so that lids (blink) move over the eyeball and the eyeball follows the socket.
            q = ((x[:n_head] - side * ex) / EYE_OPENING[0]) ** 2 + ((y[:n_head] - ey) / EYE_OPENING[1]) ** 2
            rim = np.flatnonzero((q > 1.6) & (q < 3.0) & (z[:n_head] > 0.03))
            d[sl] = d[rim].mean(0)
        out.append(d)
    return out


# --- UV mask ---------------------------------------------------------------------------------------

def face_region(p):
    """1 inside the face/eye texture region of the neutral head (forehead to chin, cheek to cheek)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return ((x / 0.066) ** 2 + ((y + 0.018) / 0.093) ** 2 <= 1.0) & (z > 0.0) & (y > -0.104)


def uv_mask(verts, info, size=UV_MASK_SIZE):
    """(size, size) uint8 mask; texel (row r, col c) <-> (u, v) = ((c + .5) / size, 1 - (r + .5) / size)."""
    index = info['index']
    grid = np.concatenate([face_region(verts[index]), face_region(verts[index[:, :1]])], 1).astype(np.float64)
    u = (np.arange(size) + 0.5) / size * N_COLS
    v = (np.arange(size) + 0.5) / size * (N_ROWS - 1)          # row index from the top of the image
    c0 = np.clip(np.floor(u).astype(int), 0, N_COLS - 1)
    r0 = np.clip(np.floor(v).astype(int), 0, N_ROWS - 2)
    fu, fv = u - c0, v - r0
    g = (grid[r0][:, c0] * (1 - fu) + grid[r0][:, c0 + 1] * fu) * (1 - fv[:, None]) + \
        (grid[r0 + 1][:, c0] * (1 - fu) + grid[r0 + 1][:, c0 + 1] * fu) * fv[:, None]
    return np.where(g >= 0.5, 255, 0).astype(np.uint8)


# --- Assembly ----------------------------------------------------------------------------------------

def build_head_model():
    """Everything the files hold, as numpy arrays (float64 until written)."""
    verts, faces, uvs, uv_faces, info = build_surface()
    n_head, n_head_faces = len(verts), len(faces)
    # Eyeballs behind the eye openings, their fronts just behind the lids' surface.
    eye_verts, eye_faces, eye_uvs, eye_slices, eye_centres = [], [], [], [], []
    for side in (+1, -1):
        # The lid surface point at the eye centre's (x, y) (two depth refinements of the ray),
        # and the eyeball straight behind it, looking along +z.
        target = np.array([side * EYE_CENTRE[0], EYE_CENTRE[1], 0.09])
        for _ in range(3):
            d = (target - CENTRE) / np.linalg.norm(target - CENTRE)
            front = surface_point(d[None])[0]
            target[2] = front[2]
        centre = front - np.array([0.0, 0.0, EYEBALL_RADIUS + 0.0005])
        ev, ef = eyeball(centre, EYEBALL_RADIUS)
        start = n_head + sum(len(e) for e in eye_verts)
        eye_slices.append(slice(start, start + len(ev)))
        eye_centres.append(centre)
        eye_verts.append(ev)
        eye_faces.append(ef + start)
        # UVs: the texture point of the head surface in the same direction from CENTRE.
        rel = ev - CENTRE
        theta = np.arctan2(rel[:, 0], rel[:, 2])
        phi = np.arccos(rel[:, 1] / np.linalg.norm(rel, axis=1))
        u = (theta_to_u(theta) + 1) / 2
        v = 1 - np.interp(phi, info['phis'], np.arange(N_ROWS)) / (N_ROWS - 1)
        eye_uvs.append(np.stack([u, v], -1))
    uv_offset = len(uvs)
    eye_uv_faces = [ef - eye_slices[k].start + uv_offset + sum(len(e) for e in eye_uvs[:k]) for k, ef in enumerate(eye_faces)]
    verts = np.concatenate([verts] + eye_verts)
    faces = np.concatenate([faces] + eye_faces)
    uvs = np.concatenate([uvs] + eye_uvs)
    uv_faces = np.concatenate([uv_faces] + eye_uv_faces)

    index, i_m, span = info['index'], info['i_mouth'], info['span']
    info['x_corner'] = float(verts[index[i_m, span[-1]], 0])
    # Base points (before features) for every vertex, for the blendshape fields.
    p0_all = verts.copy()
    p0_all[index[1:].reshape(-1)] = info['p0'][1:].reshape(-1, 3)
    info['p0_all'] = p0_all
    lower_side = np.zeros(len(verts))
    rows = np.repeat(np.arange(N_ROWS)[:, None], N_COLS, 1)
    lower_side[index[1:].reshape(-1)] = (rows[1:] > i_m).reshape(-1).astype(np.float64)
    lower_side[index[i_m, span[[0, -1]]]] = 0.5

    weights = skinning_weights(verts, n_head, info, eye_slices)
    J_regressor = joint_regressor(verts, info, eye_slices)
    shapedirs, expdirs = blendshapes(verts, n_head, info, eye_slices, lower_side)
    lmk_faces, lmk_bary = embed_landmarks(verts, faces, n_head_faces, info)
    model = {
        'v_template': verts.astype(np.float32),
        'f': faces.astype(np.int64),
        'shapedirs': np.concatenate([shapedirs, expdirs], -1).astype(np.float32),
        'posedirs': np.zeros([len(verts), 3, 36], dtype=np.float32),
        'J_regressor': J_regressor.astype(np.float32),
        'weights': weights.astype(np.float32),
        'kintree_table': KINTREE.copy(),
        'n_shape_components': np.array(N_SHAPE, dtype=np.int64),   # not in FLAME's files (they hold 300)
    }
    embedding = {
        'full_lmk_faces_idx': lmk_faces[None].astype(np.int64),
        'full_lmk_bary_coords': lmk_bary[None].astype(np.float32),
        'static_lmk_faces_idx': lmk_faces[17:].astype(np.int64),
        'static_lmk_bary_coords': lmk_bary[17:].astype(np.float32),
        # DECA indexes 79 yaw bins (-39..39 degrees); this model's contour does not depend on yaw.
        'dynamic_lmk_faces_idx': np.repeat(lmk_faces[None, :17], 79, 0).astype(np.int64),
        'dynamic_lmk_bary_coords': np.repeat(lmk_bary[None, :17], 79, 0).astype(np.float32),
    }
    landmarks = np.einsum('nk,nkj->nj', lmk_bary, verts[faces[lmk_faces]])
    return dict(model=model, embedding=embedding, uvs=uvs.astype(np.float32), uv_faces=uv_faces,
                mask=uv_mask(verts, info), landmarks=landmarks.astype(np.float32), info=info,
                n_head_vertices=n_head, n_head_faces=n_head_faces)


README_TEXT = """# Procedural head model (FLAME file formats)

Generated by `dataset_preprocessing/head_model/make_head_model.py` (deterministic; rerun it
to rebuild these files byte for byte). It is the project's own model, not FLAME: it uses
FLAME's file layouts and array names so that every code path that takes FLAME files
takes these unchanged.

- Space: metres, +x the subject's left, +y up, +z out of the face; origin near the head
  centre between the ears. Head about {width:.3f} m wide above the ears ({ears:.3f} m with
  them), chin to crown {height:.3f} m, nose tip at z = {nose:.3f} m, a neck below.
- Mesh: {n_verts} vertices ({n_head} head surface + 2 eyeballs x {n_eye}), {n_faces} faces,
  {n_uvs} texture coordinates (seams at the back of the head, the crown and the eyeballs).
  Faces are counter-clockwise seen from outside. The head surface is closed except at the
  neck cut and the mouth slit; the eyeballs are closed spheres.
- Joints (FLAME order): global, neck, jaw, eye_left (+x), eye_right (-x). The lips meet
  along a slit between the mouth corners: the upper lip is skinned to the head, the lower
  lip to the jaw, so a jaw rotation (positive x axis-angle) opens a real hole into the
  head. posedirs are zero (no pose correctives).
- shapedirs: {n_shape} identity components (head width, cranium height, head depth, face
  length, jaw width, nose size, nose width, chin, brow ridge, eye spacing, lip fullness,
  cheek fullness), then {n_exp} expression components (smile, brow raise, brow furrow, lip
  pucker, blink left, blink right, mouth stretch, upper lip raise, lower lip depress,
  cheek puff, nose wrinkle, frown). Coefficient 1 is about one standard deviation of
  identity / a moderate expression. Tested ranges without folded faces: identity +-1
  (sample N(0, 1)), expressions up to 1.5 (blinks and the lip raise/depress are
  one-sided: keep them >= 0), jaw opening up to 15 degrees (about 18 before the skin
  under the chin starts to fold).
- landmark_embedding.npy: DECA layout; `full_lmk_*` hold the 68 iBUG points (faces +
  barycentrics); `static_*` are points 17-67; `dynamic_*` repeat the jaw contour for all
  79 yaw bins (the contour does not slide with yaw in this model).
- uv_face_eye_mask.png: 256x256, white where the texture belongs to the face and eyes.
  Image row 0 is v = 1 (top of the texture).
- neutral.obj / neutral_lms.txt: the neutral mesh and its 68 landmarks (68 x 3).

Load it with `training.mesh.head_model.load_head_model()` or
`FlameModel('data/head_model/generic_model.pkl', 'data/head_model/landmark_embedding.npy')`.
"""


def _png_bytes(mask):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(mask, mode='L').save(buf, format='PNG', optimize=False)
    return buf.getvalue()


def write_head_model(outdir):
    """Builds the model and writes all its files into `outdir` (atomically, file by file)."""
    os.makedirs(outdir, exist_ok=True)
    m = build_head_model()
    model, v = m['model'], m['model']['v_template']
    atomic_write_bytes(os.path.join(outdir, 'generic_model.pkl'), pickle.dumps(model, protocol=4))
    buf = io.BytesIO()
    np.save(buf, np.array(m['embedding'], dtype=object), allow_pickle=True)
    atomic_write_bytes(os.path.join(outdir, 'landmark_embedding.npy'), buf.getvalue())
    write_obj(os.path.join(outdir, 'head_template.obj'), v, model['f'], m['uvs'], m['uv_faces'])
    write_obj(os.path.join(outdir, 'neutral.obj'), v, model['f'])
    write_landmarks(os.path.join(outdir, 'neutral_lms.txt'), m['landmarks'])
    atomic_write_bytes(os.path.join(outdir, 'uv_face_eye_mask.png'), _png_bytes(m['mask']))
    head = v[:m['n_head_vertices']]
    text = README_TEXT.format(
        width=float(np.ptp(head[head[:, 1] > 0.04, 0])), ears=float(np.ptp(head[:, 0])),
        height=float(head[:, 1].max() - m['landmarks'][8, 1]), nose=float(m['landmarks'][30, 2]),
        n_verts=len(v), n_head=m['n_head_vertices'], n_eye=(len(v) - m['n_head_vertices']) // 2,
        n_faces=len(model['f']), n_uvs=len(m['uvs']), n_shape=N_SHAPE, n_exp=N_EXP)
    atomic_write_bytes(os.path.join(outdir, 'README.md'), text.encode('utf-8'))
    return m


@click.command()
@click.option('--outdir', help='Output folder', default='data/head_model', show_default=True)
def main(outdir):
    """Writes the procedural head model (FLAME formats) into OUTDIR."""
    m = write_head_model(outdir)
    v = m['model']['v_template']
    click.echo(f'{outdir}: {len(v)} vertices, {len(m["model"]["f"])} faces, {len(m["uvs"])} uvs')


if __name__ == '__main__':
    main()
