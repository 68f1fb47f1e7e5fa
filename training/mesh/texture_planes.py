"""Rasterize a mesh's neural texture into the three feature planes of a tri-plane.

Next3D's key step (spec section 4): the textured mesh is rendered orthographically from
four axis-aligned views (`coords.ORTHO_VIEWS_DEG`: front, left = yaw +90, right = yaw -90,
top), hard rasterization, one face per pixel, nearest surface, back faces culled. The two
yaw views are summed into one "side" render. The renders then become the planes.

Layouts
-------
'aligned' (default for new models). View NDC = ORTHO_SCALE * M R (mesh + MESH_SHIFT), with
    R = Rz Ry Rx of the view and M = diag(1, -1, -1) taking the rotated mesh frame (x right,
    y up, z towards the viewer) into the NDC frame (x right, y down, z away), so each view
    is a proper rotation and the images are upright:
      front: columns +x, rows -y (row 0 = top of the head), viewer at +z.
      left:  columns +z, rows -y, viewer at -x.   right: columns -z, rows -y, viewer at +x.
      top:   columns +x, rows +z (face at the bottom), viewer at +y.
    `side` = left + right mirrored left-right, i.e. in the left view's orientation.
    `to_planes` turns every render into the plane with the same two axes, transposed and
    flipped into grid_sample orientation, so that a world point samples the feature of the
    surface it lies on (tests/test_texture_planes.py checks this at every visible point).
'released' (compatibility with the official weights). Reproduces the released code's
    pixels: mesh y flipped before the view rotation is applied as v @ R, the shift added
    after it, image row = +5 (y + 0.01) for the front view (the head upside down), the two
    yaw views summed without mirroring, [front, side, top] put on planes 0, 1, 2 as they
    are, and empty pixels holding the texture sampled at the UV centre. Only the front
    render lands on a plane with matching axes, and it puts the mesh at world
    y = 2.5 (y + 0.01), 0.05 world units above `coords.mesh_to_world` (2.5 (y - 0.01)):
    the y flip comes before the shift in the released code. Barycentrics as pytorch3d
    computes them (`rasterize(..., pytorch3d_bary=True)`).

Side alpha: 'or' = left alpha OR mirrored right alpha; 'released' = the left view's alpha
only (the original ORs a view with itself). Either way it is binarised (> 0), as the
original's boolean OR.

Hole filling: pixels that cannot be reached from the image border through pixels with
alpha < 1 (the open mouth, enclosed by the lips) get alpha = 1; their render value is
what the view holds there (0 in 'aligned', the texture centre in 'released'), as in the
original, which fills alpha only. Reachability comes from SciPy's connected components on
the CPU, and from alternating row and column run propagation on other devices (see
`fill_enclosed`).
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from torch_utils import misc, persistence
from torch_utils.ops import bilinear_mean
from training import coords
from training.mesh.rasterize import rasterize

VIEW_NAMES = ('front', 'left', 'right', 'top')
LAYOUTS = ('aligned', 'released')
SIDE_ALPHA_MODES = ('or', 'released')
_OUTSIDE_GRID = -4.0      # grid_sample coordinate of empty pixels: reads zero padding


class ViewGeometry(NamedTuple):
    """The four views' geometry (TexturePlaneRasterizer.geometry), P = image_size, batch first."""
    grid: torch.Tensor          # (B, 4 P P, 2) float: grid_sample coordinates of each pixel on the texture, views in VIEW_NAMES order
    covered: torch.Tensor       # (B, 4, P P) bool: a face covers the pixel
    alpha: torch.Tensor         # (B, 4, 1, P, P) float: visibility x UV mask, enclosed holes 1


def view_transform(name: str, layout: str = 'aligned') -> Tuple[torch.Tensor, torch.Tensor]:
    """Affine map of mesh metres to a view's NDC: ndc = mesh @ L.T + t.

    Returns L (3, 3) and t (3,) float32. det(L) > 0 for 'aligned' (proper rotation x 5);
    det(L) < 0 for 'released' (the released views are mirror images).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got '{layout}'")
    rot = coords.euler_to_matrix(torch.tensor(coords.ORTHO_VIEWS_DEG[name]))
    shift = torch.tensor(coords.MESH_SHIFT)
    s = coords.ORTHO_SCALE
    if layout == 'aligned':
        lin = s * torch.diag(torch.tensor([1.0, -1.0, -1.0])) @ rot
        return lin, lin @ shift
    # Released: a = 5 (R^T diag(1,-1,1) m + shift); image (col, row, depth) = (a0, -a1, -a2).
    flip_out = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    lin = s * flip_out @ rot.T @ torch.diag(torch.tensor([1.0, -1.0, 1.0]))
    return lin, s * flip_out @ shift


def _axes_of(lin: torch.Tensor):
    out = []
    for r in range(2):
        a = int(lin[r].abs().argmax())
        out.append((a, 1 if lin[r, a] > 0 else -1))
    return tuple(out)


# Made once: each forward asks several times, and each answer costs dozens of small ops and four scalar reads.
_IMAGE_AXES = {(name, layout): _axes_of(view_transform(name, layout)[0]) for name in VIEW_NAMES for layout in LAYOUTS}


def _image_axes(name: str, layout: str):
    """((column axis, sign), (row axis, sign)) of a view's image in mesh axes."""
    return _IMAGE_AXES[(name, layout)]


# Eager under torch.compile: the number of rounds depends on the image (a host sync), and
# inductor (torch 2.13, CPU) cannot build its vectorised boolean kernel for the runs.
@torch.compiler.disable
def fill_enclosed(alpha: torch.Tensor, max_rounds: int = 1024) -> torch.Tensor:
    """Set alpha = 1 where a pixel cannot be reached from the image border.

    alpha: (N, 1, H, W) in [0, 1]. A pixel is passable when alpha * 255 <= 254 (the
    original's 8-bit flood fill), reachable when a 4-connected path of passable pixels
    joins it to a passable border pixel (the original seeds at pixel (0, 0) only). On the
    CPU (outside torch.compile) the connected components come from SciPy's labelling, one
    call for the batch (_reachable_by_labels); elsewhere from run propagation on the
    tensors' device, at most max_rounds rounds (_reachable_by_runs). Both give the same
    pixels (on the batch of a small128 generator, 2.5 against 8.7 ms on one CPU thread).
    """
    passable = alpha[:, 0] * 255 <= 254
    if alpha.device.type == 'cpu' and not torch.compiler.is_compiling():
        reach = _reachable_by_labels(passable)
    else:
        reach = _reachable_by_runs(passable, max_rounds)
    return torch.where(reach[:, None], alpha, torch.ones_like(alpha))


def _reachable_by_labels(passable: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool CPU -> the passable pixels 4-connected to a passable border pixel:
    the components of scipy.ndimage.label (its structure joins no two images) that
    touch the border."""
    if passable.numel() == 0:
        return passable.clone()
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    labels, count = scipy.ndimage.label(passable.numpy(), structure)
    on_border = np.zeros(count + 1, dtype=bool)
    for edge in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        on_border[edge] = True
    on_border[0] = False                                         # label 0: not passable
    return torch.from_numpy(on_border[labels])


def _reachable_by_runs(passable: torch.Tensor, max_rounds: int) -> torch.Tensor:
    """_reachable_by_labels by propagation in torch ops (any device, torch.compile). One
    round spreads reachability along whole runs of passable pixels, first in rows, then in
    columns, so a path with k turns needs about k / 2 rounds (one or two for a mouth).
    Reachability only grows, so the first round that changes nothing marks the fixed
    point. That test needs the host (one sync); it is made after rounds 2, 4, 8, ... only,
    comparing the last round's input and output, so a mouth costs two rounds and one sync.
    No fixed round count would do without it: a maze can need of the order of H W rounds.
    """
    border = torch.zeros_like(passable)
    border[:, 0, :] = border[:, -1, :] = True
    border[:, :, 0] = border[:, :, -1] = True
    reach = passable & border
    rounds, next_check = 0, min(2, max_rounds)
    while rounds < max_rounds:
        while rounds < next_check:
            before = reach
            reach = _spread_along_runs(reach, passable, dim=2)
            reach = _spread_along_runs(reach, passable, dim=1)
            rounds += 1
        if torch.equal(reach, before):                          # the last round changed nothing
            break
        next_check = min(2 * next_check, max_rounds)
    return reach


def _spread_along_runs(reach: torch.Tensor, passable: torch.Tensor, dim: int) -> torch.Tensor:
    """Mark a whole run of passable pixels along `dim` reachable if any pixel of it is.

    The runs of each line are numbered by the impassable pixels before them (a cumulative
    sum); one sum per run of its reachable pixels, read back at every pixel of the run.
    A dozen ops whatever the size (pointer doubling took ~80 for 64 pixels: on a GPU each
    is a launch), the same booleans, and a little faster on the CPU.
    """
    reach = reach & passable
    n = passable.shape[dim]
    if reach.numel() == 0:
        return reach
    run = (~passable).cumsum(dim, dtype=torch.int32).movedim(dim, -1)        # pixels of one run share a number
    reach = reach.movedim(dim, -1)
    lines = reach.numel() // n
    first = torch.arange(0, lines * (n + 1), n + 1, dtype=torch.int32, device=run.device).view(*reach.shape[:-1], 1)
    index = (run + first).reshape(-1)                                       # (line, run) slots, n + 1 per line
    hits = torch.zeros(lines * (n + 1), dtype=torch.int32, device=run.device).index_add_(0, index, reach.reshape(-1).to(torch.int32))
    return (hits.index_select(0, index).view(reach.shape) > 0).movedim(-1, dim) & passable


@persistence.persistent_class
class TexturePlaneRasterizer(torch.nn.Module):
    def __init__(self,
        num_faces,                      # Faces of the template mesh (FLAME: 9976).
        num_uvs,                        # Texture coordinates of the template (FLAME: 5118).
        image_size      = 256,          # Resolution of the renders and of the planes.
        layout          = 'aligned',    # 'aligned' (new models) or 'released' (official weights), see module docstring.
        side_alpha      = 'or',         # 'or': side alpha = OR of both yaw views; 'released': the left view's alpha only.
        plane_axes      = 'next3d',     # Key of coords.PLANE_AXES used by `to_planes` in the aligned layout.
        mask_size       = 256,          # Resolution of the face/eye UV mask buffer.
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got '{layout}'")
        if side_alpha not in SIDE_ALPHA_MODES:
            raise ValueError(f"side_alpha must be one of {SIDE_ALPHA_MODES}, got '{side_alpha}'")
        if plane_axes not in coords.PLANE_AXES:
            raise ValueError(f"plane_axes must be one of {tuple(coords.PLANE_AXES)}, got '{plane_axes}'")
        self.num_faces = int(num_faces)
        self.num_uvs = int(num_uvs)
        self.image_size = int(image_size)
        self.layout = layout
        self.side_alpha = side_alpha
        self.plane_axes = plane_axes
        self.register_buffer('faces', torch.zeros(self.num_faces, 3, dtype=torch.int64))
        self.register_buffer('uvfaces', torch.zeros(self.num_faces, 3, dtype=torch.int64))
        self.register_buffer('uvcoords', torch.zeros(self.num_uvs, 2))
        self.register_buffer('uv_mask', torch.ones(1, 1, mask_size, mask_size))
        lins, offs = zip(*[view_transform(v, layout) for v in VIEW_NAMES])
        self.register_buffer('view_lin', torch.stack(lins), persistent=False)   # (4, 3, 3)
        self.register_buffer('view_off', torch.stack(offs), persistent=False)   # (4, 3)
        rots = [coords.euler_to_matrix(torch.tensor(coords.ORTHO_VIEWS_DEG[v])) for v in VIEW_NAMES]
        self.register_buffer('view_rot', torch.stack(rots), persistent=False)   # (4, 3, 3), 'released'

    def extra_repr(self) -> str:
        return (f'num_faces={self.num_faces}, num_uvs={self.num_uvs}, image_size={self.image_size}, '
                f'layout={self.layout}, side_alpha={self.side_alpha}, plane_axes={self.plane_axes}')

    # --- topology ------------------------------------------------------------------------

    def load_topology(self, faces, uvfaces, uvcoords, uv_mask=None):
        """Fill the buffers. faces/uvfaces (F, 3) int, uvcoords (T, 2) in [0, 1] (v up, as
        in OBJ files), uv_mask (H, W) or (1, 1, H, W) in [0, 1] (row 0 = v = 1)."""
        faces, uvfaces = torch.as_tensor(np.asarray(faces)).long(), torch.as_tensor(np.asarray(uvfaces)).long()
        uvcoords = torch.as_tensor(np.asarray(uvcoords), dtype=torch.float32)
        for name, t, shape in (('faces', faces, (self.num_faces, 3)), ('uvfaces', uvfaces, (self.num_faces, 3)),
                               ('uvcoords', uvcoords, (self.num_uvs, 2))):
            if tuple(t.shape) != shape:
                raise ValueError(f'{name}: expected shape {shape}, got {tuple(t.shape)}')
        if int(uvfaces.min()) < 0 or int(uvfaces.max()) >= self.num_uvs:
            raise ValueError(f'uvfaces index texture coordinates outside [0, {self.num_uvs})')
        self.faces.copy_(faces)
        self.uvfaces.copy_(uvfaces)
        self.uvcoords.copy_(uvcoords)
        if uv_mask is not None:
            m = torch.as_tensor(np.asarray(uv_mask), dtype=torch.float32)
            m = m.reshape(1, 1, *m.shape[-2:])
            if m.shape[-2:] != self.uv_mask.shape[-2:]:
                m = F.interpolate(m, size=self.uv_mask.shape[-2:], mode='nearest')
            self.uv_mask.copy_(m.clamp(0, 1))
        return self

    @classmethod
    def from_template(cls, template_obj_path, uv_mask_path=None, **kwargs):
        """Build from a template OBJ (v, vt, f v/vt) and a face/eye UV mask image (white = 1)."""
        from training.mesh.head_model import load_template, load_uv_mask
        faces, uvcoords, uvfaces = load_template(template_obj_path)
        module = cls(num_faces=len(faces), num_uvs=len(uvcoords), **kwargs)
        mask = None if uv_mask_path is None else load_uv_mask(uv_mask_path, size=None)
        return module.load_topology(faces, uvfaces, uvcoords, mask)

    # --- rendering -----------------------------------------------------------------------

    def to_view_ndc(self, points: torch.Tensor) -> torch.Tensor:
        """Mesh metres (B, N, 3) -> NDC of the four views (4, B, N, 3), order VIEW_NAMES."""
        if self.layout == 'released':
            # view_transform's map as the released code's own float operations (flip y,
            # v @ R, + shift, x 5): its NDC bit for bit, so that the barycentrics of faces a
            # fraction of a pixel wide agree too.
            flipped = points * points.new_tensor([1.0, -1.0, 1.0])
            shift = points.new_tensor(coords.MESH_SHIFT)
            views = []
            for rot in self.view_rot.to(points.dtype):
                a = (torch.bmm(flipped, rot.expand(len(points), 3, 3)) + shift) * coords.ORTHO_SCALE
                views.append(torch.stack([a[..., 0], -a[..., 1], -a[..., 2]], dim=-1))
            return torch.stack(views)
        lin, off = self.view_lin.to(points.dtype), self.view_off.to(points.dtype)
        return torch.einsum('vij,bnj->vbni', lin, points) + off[:, None, None, :]

    def _render_faces(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """faces and uvfaces as the renders use them: 'released' mirrors the views, so its
        faces run 0, 2, 1 to keep front faces front. Those are made once per state of the
        buffers and reused, so that the rasterizer checks their range once (on a GPU, a sync
        per forward otherwise)."""
        if self.layout != 'released':
            return self.faces, self.uvfaces
        key = (misc.version_key(self.faces), misc.version_key(self.uvfaces))
        if None in key or getattr(self, '_mirrored_faces_key', None) != key:
            self._mirrored_faces = (self.faces[:, [0, 2, 1]], self.uvfaces[:, [0, 2, 1]])
            self._mirrored_faces_key = key
        return self._mirrored_faces

    def geometry(self, verts: torch.Tensor) -> ViewGeometry:
        """What the four views take from the mesh alone (not from the texture): where each
        pixel reads the texture, which pixels a face covers, and the alphas (visibility x UV
        mask, enclosed holes set to 1). verts (B, V, 3) mesh metres -> ViewGeometry, batch
        first (a batch of them splits and concatenates along dim 0).

        It depends on no weights, so it can be made before a training step, e.g. in the
        data loader's workers (training_loop.GeometryCollate), and given to `forward`. grid and
        alpha are float32 (the topology buffers' dtype); `render_views` casts them to the
        texture's.
        """
        misc.assert_shape(verts, [None, None, 3], 'verts')
        bsz, res = verts.shape[0], self.image_size
        ndc = self.to_view_ndc(verts).reshape(4 * bsz, -1, 3)
        faces, uvfaces = self._render_faces()
        frag = rasterize(ndc, faces, res, cull_backfaces=True, pytorch3d_bary=self.layout == 'released')
        # Every pixel of the 4B renders at once: no host sync, no loop over the batch. Empty
        # pixels get a grid point far outside [-1, 1], which grid_sample's zero padding reads
        # as 0 (and which passes no gradient).
        # Each pixel's grid point, computed in (B, 4, HW) order (what bilinear_mean reads:
        # image b's four views), one coordinate at a time on contiguous arrays.
        face = frag.pix_to_face.reshape(4, bsz, res * res).transpose(0, 1)               # (B, 4, HW)
        covered = face >= 0
        covered_flat = covered.reshape(-1)
        index = face.clamp(min=0).reshape(-1)
        bary = frag.bary.reshape(4, bsz, res * res, 3).permute(3, 1, 0, 2).reshape(3, -1)   # (3, B 4 HW)
        # Interpolate the corners' grid_sample coordinates (OBJ v is up), not their UVs: the
        # same when the barycentrics sum to 1, and what the released code does when they
        # do not (pytorch3d_bary).
        grid = []
        for corner_coord in (self.uvcoords[:, 0] * 2 - 1, 1 - self.uvcoords[:, 1] * 2):
            per_face = corner_coord[uvfaces.t()]                                           # (3, F)
            at = [per_face[k].index_select(0, index) for k in range(3)]                    # several times faster than [index]
            value = bary[0] * at[0] + bary[1] * at[1] + bary[2] * at[2]
            grid.append(torch.where(covered_flat, value, torch.full_like(value, _OUTSIDE_GRID)))
        grid = torch.stack(grid, dim=-1).reshape(bsz, 4 * res * res, 2)
        alpha = F.grid_sample(self.uv_mask.to(grid.dtype), grid.reshape(1, 1, -1, 2), mode='bilinear', padding_mode='zeros',
                              align_corners=False).view(bsz * 4, 1, res, res)
        alpha = fill_enclosed(alpha).reshape(bsz, 4, 1, res, res)
        return ViewGeometry(grid=grid, covered=covered, alpha=alpha)

    def render_views(self, verts: torch.Tensor, texture: torch.Tensor,
                     geometry: Optional[ViewGeometry] = None) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Render the four views: {name: (render (B, C, H, W), alpha (B, 1, H, W))}.

        Each render is in its own image orientation (module docstring); the right view is
        not mirrored here. alpha = visibility x UV mask, enclosed holes set to 1.
        geometry: self.geometry(verts) made beforehand, or None to make it here.
        """
        misc.assert_shape(verts, [None, None, 3], 'verts')
        misc.assert_shape(texture, [verts.shape[0], None, None, None], 'texture')
        if geometry is None:
            geometry = self.geometry(verts)
        bsz, res = verts.shape[0], self.image_size
        misc.assert_shape(geometry.grid, [bsz, 4 * res * res, 2], 'geometry.grid')
        misc.assert_shape(geometry.covered, [bsz, 4, res * res], 'geometry.covered')
        misc.assert_shape(geometry.alpha, [bsz, 4, 1, res, res], 'geometry.alpha')
        # Image b reads texture b: (B, 4 HW, C) rows (on the CPU a weighted sum of 4 texels per pixel) -> (4, B, C, HW).
        # unsqueeze, not [:, None]: in older torch (2.4) the full slice's backward is a contiguous copy.
        render = bilinear_mean.bilinear_mean(texture.unsqueeze(1), geometry.grid[:, None].to(texture.dtype))
        render = render.reshape(bsz, 4, res * res, -1).permute(1, 0, 3, 2)
        if self.layout == 'released':                            # empty pixels: texture at the UV centre
            centre = F.grid_sample(texture, texture.new_zeros(bsz, 1, 1, 2), align_corners=False)[:, :, 0, 0]
            render = torch.where(geometry.covered.transpose(0, 1)[:, :, None, :], render, centre[None, :, :, None])
        render = render.reshape(4, bsz, texture.shape[1], res, res)
        alpha = geometry.alpha.to(texture.dtype).transpose(0, 1)
        # One gradient for the four views, in the renders' layout (on the CPU channels-last
        # views of the sampled rows): the backward of four selects would zero-fill four copies
        # of all renders, and unbind's stacks them contiguously (a transposing copy back).
        render = [view.squeeze(0) for view in misc.split_keeping_gradient_layout(render)]
        return dict(zip(VIEW_NAMES, zip(render, alpha.unbind(0))))

    def mirror_right_view(self, right: torch.Tensor) -> torch.Tensor:
        """The right view's render or alpha in the side orientation: mirrored into the left
        view's orientation ('aligned'), or as it is ('released': the original sums the two
        views' mirror images)."""
        if self.layout == 'released':
            return right
        (lc, lcs), (lr, lrs) = _image_axes('left', self.layout)
        (rc, rcs), (rr, rrs) = _image_axes('right', self.layout)
        assert (lc, lr) == (rc, rr)
        dims = [d for d, same in ((-1, lcs == rcs), (-2, lrs == rrs)) if not same]
        return right.flip(dims) if dims else right

    def forward(self, verts: torch.Tensor, texture: torch.Tensor, geometry: Optional[ViewGeometry] = None) -> Dict[str, torch.Tensor]:
        """verts (B, V, 3) mesh metres, texture (B, C, Ht, Wt) -> dict of renders (B, C, H, W)
        and alphas (B, 1, H, W): front, side (left + right), top, each with `<name>_alpha`.
        geometry: self.geometry(verts) made beforehand (the same result), or None."""
        views = self.render_views(verts, texture, geometry)
        (front, front_a), (left, left_a), (right, right_a), (top, top_a) = [views[n] for n in VIEW_NAMES]
        side = left + self.mirror_right_view(right)
        if self.side_alpha == 'or':
            side_a = torch.maximum(left_a, self.mirror_right_view(right_a))
        else:
            side_a = left_a                                      # the original ORed a view with itself
        # The original ORs booleans: alpha becomes 0/1 (a partial mask value counts as 1).
        side_a = (side_a > 0).to(side_a.dtype)
        return dict(front=front, front_alpha=front_a, side=side, side_alpha=side_a, top=top, top_alpha=top_a)

    def to_planes(self, front: torch.Tensor, side: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """Renders (B, C, H, W) -> planes (B, 3, C, H, W) in `plane_axes` order, grid_sample
        orientation (column = first axis, row = second, both increasing with the world
        coordinate). Works for renders and alphas alike."""
        return torch.stack(self.plane_images(front, side, top), dim=1)

    def plane_images(self, front: torch.Tensor, side: torch.Tensor, top: torch.Tensor) -> List[torch.Tensor]:
        """to_planes' three planes (B, C, H, W) before they are stacked: views of the renders
        where no flip is needed."""
        if self.layout == 'released':
            return [front, side, top]
        images = {'front': front, 'left': side, 'top': top}     # side is in the left view's orientation
        planes = []
        for a, b in coords.PLANE_AXES[self.plane_axes]:
            for name, img in images.items():
                (ca, cs), (ra, rs) = _image_axes(name, self.layout)
                if {ca, ra} == {a, b}:
                    break
            else:
                raise ValueError(f'no render has the axes ({a}, {b}) of plane_axes {self.plane_axes}')
            if ca != a:                                          # swap columns and rows
                img, (ca, cs), (ra, rs) = img.transpose(-1, -2), (ra, rs), (ca, cs)
            dims = [d for d, sign in ((-1, cs), (-2, rs)) if sign < 0]
            planes.append(img.flip(dims) if dims else img)
        return planes

    def project_landmarks_front(self, lms: torch.Tensor) -> torch.Tensor:
        """(B, 68, 3) mesh metres -> (B, 68, 2) pixel coordinates in the front render
        (x = column, y = row; pixel = ndc * size/2 + size/2, so centres are at i + 0.5)."""
        misc.assert_shape(lms, [None, None, 3], 'lms')
        ndc = self.to_view_ndc(lms)[0]
        half = self.image_size / 2
        return ndc[..., :2] * half + half
