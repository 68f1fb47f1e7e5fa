"""A compact, differentiable subset of ADA's augmentations (Karras et al. 2020) for D's inputs.

Geometric transforms (one 2D affine map per sample, applied by bilinear resampling with
reflection at the borders): x-flip, rotation by multiples of 90 degrees, integer
translation, isotropic scaling, arbitrary rotation, anisotropic scaling, fractional
translation. Colour transforms (one 4x4 affine map of RGB per sample): brightness,
contrast, luma flip, hue rotation, saturation. Each transform is applied to a sample with
probability p x its strength; `p` is a buffer the training loop adapts (ADA) or fixes.

Input: (B, C, H, W) float images in [-1, 1] with C a multiple of 3: every group of three
channels gets the same colour map and all channels the same geometric map, so the dual
discriminator's [image, upsampled image_raw] pair is augmented identically. Everything is
a differentiable function of the input (the random draws are not), as ADA requires: G
receives gradients through the augmentation.

Simplification against ADA: resampling is one bilinear grid_sample (ADA upsamples 2x with
a windowed-sinc filter first), and the rotation is applied once (ADA may apply it twice).
"""

import math

import torch
import torch.nn.functional as F

from torch_utils import misc
from torch_utils import persistence
from torch_utils.ops.grid_sample import grid_sample

# ADA's 'bgc' pipeline (blit + geometric + colour): the one EG3D uses.
BGC = dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1,
           brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)

_LUMA = torch.tensor([1.0, 1.0, 1.0]) / math.sqrt(3)


def _luma(device) -> tuple:
    """v v^T and the cross-product matrix [v]x of the luma axis v, on `device`, made there once
    (a copy per call, or a matrix built from a device tensor's elements, waits for the GPU)."""
    v = _LUMA
    return (misc.device_constant('augment.luma_outer', device, lambda d: torch.outer(v, v).to(d)),
            misc.device_constant('augment.luma_cross', device, lambda d: torch.tensor(
                [[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]]).to(d)))


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    """(B,) angles -> (B, 3, 3) homogeneous 2D rotations."""
    c, s = torch.cos(theta), torch.sin(theta)
    z, o = torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(-1, 3, 3)


def _scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    z, o = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, z, z, z, sy, z, z, z, o], dim=-1).reshape(-1, 3, 3)


def _translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    z, o = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([o, z, tx, z, o, ty, z, z, o], dim=-1).reshape(-1, 3, 3)


def _color_matrix(lin: torch.Tensor, offset: torch.Tensor = None) -> torch.Tensor:
    """(B, 3, 3) linear part [+ (B, 3) offset] -> (B, 4, 4) homogeneous colour map."""
    b = lin.shape[0]
    m = torch.eye(4, device=lin.device, dtype=lin.dtype).repeat(b, 1, 1)
    m[:, :3, :3] = lin
    if offset is not None:
        m[:, :3, 3] = offset
    return m


@persistence.persistent_class
class AugmentPipe(torch.nn.Module):
    """Random differentiable augmentations with overall probability `p` (a buffer)."""

    def __init__(self,
        xflip: float = 0,           # strength of x-flips
        rotate90: float = 0,        # strength of rotations by k x 90 degrees
        xint: float = 0,            # strength of integer translations
        scale: float = 0,           # strength of isotropic scaling
        rotate: float = 0,          # strength of arbitrary rotations
        aniso: float = 0,           # strength of anisotropic scaling
        xfrac: float = 0,           # strength of fractional translations
        brightness: float = 0,      # strength of brightness offsets
        contrast: float = 0,        # strength of contrast scaling
        lumaflip: float = 0,        # strength of luma flips
        hue: float = 0,             # strength of hue rotations
        saturation: float = 0,      # strength of saturation scaling
        xint_max: float = 0.125,    # integer translation range, fraction of the image size
        scale_std: float = 0.2,     # log2 std of isotropic scaling
        rotate_max: float = 1.0,    # rotation range, fraction of 180 degrees
        aniso_std: float = 0.2,     # log2 std of anisotropic scaling
        xfrac_std: float = 0.125,   # std of fractional translation, fraction of the image size
        brightness_std: float = 0.2,    # std of brightness offsets (image units)
        contrast_std: float = 0.5,  # log2 std of contrast scaling
        hue_max: float = 1.0,       # hue rotation range, fraction of 180 degrees
        saturation_std: float = 1.0,    # log2 std of saturation scaling
    ):
        super().__init__()
        self.register_buffer('p', torch.zeros([]))
        self.strength = dict(xflip=xflip, rotate90=rotate90, xint=xint, scale=scale, rotate=rotate, aniso=aniso, xfrac=xfrac,
                             brightness=brightness, contrast=contrast, lumaflip=lumaflip, hue=hue, saturation=saturation)
        self.xint_max, self.scale_std, self.rotate_max, self.aniso_std, self.xfrac_std = xint_max, scale_std, rotate_max, aniso_std, xfrac_std
        self.brightness_std, self.contrast_std, self.hue_max, self.saturation_std = brightness_std, contrast_std, hue_max, saturation_std

    def _enabled(self, name: str, b: int, device) -> torch.Tensor:
        """(B,) bool: apply transform `name` to each sample (probability p x strength)."""
        prob = self.p * self.strength[name]
        return torch.rand([b], device=device) < prob

    def geometric_matrix(self, b: int, w: int, h: int, device) -> torch.Tensor:
        """(B, 3, 3) map from input to output positions, in grid_sample's normalised coordinates."""
        eye = torch.eye(3, device=device).repeat(b, 1, 1)
        m = eye

        def where(enabled, mat):
            return torch.where(enabled[:, None, None], mat, eye)
        if self.strength['xflip'] > 0:
            flip = torch.randint(2, [b], device=device).float()
            m = where(self._enabled('xflip', b, device), _scale2d(1 - 2 * flip, torch.ones_like(flip))) @ m
        if self.strength['rotate90'] > 0:
            k = torch.randint(4, [b], device=device).float()
            m = where(self._enabled('rotate90', b, device), _rotation(k * math.pi / 2)) @ m
        if self.strength['xint'] > 0:
            t = (torch.rand([b, 2], device=device) * 2 - 1) * self.xint_max
            tx, ty = torch.round(t[:, 0] * w) * 2 / w, torch.round(t[:, 1] * h) * 2 / h     # whole pixels
            m = where(self._enabled('xint', b, device), _translate2d(tx, ty)) @ m
        if self.strength['scale'] > 0:
            s = torch.exp2(torch.randn([b], device=device) * self.scale_std)
            m = where(self._enabled('scale', b, device), _scale2d(s, s)) @ m
        if self.strength['rotate'] > 0:
            theta = (torch.rand([b], device=device) * 2 - 1) * math.pi * self.rotate_max
            m = where(self._enabled('rotate', b, device), _rotation(theta)) @ m
        if self.strength['aniso'] > 0:
            s = torch.exp2(torch.randn([b], device=device) * self.aniso_std)
            m = where(self._enabled('aniso', b, device), _scale2d(s, 1 / s)) @ m
        if self.strength['xfrac'] > 0:
            t = torch.randn([b, 2], device=device) * self.xfrac_std * 2
            m = where(self._enabled('xfrac', b, device), _translate2d(t[:, 0], t[:, 1])) @ m
        return m

    def color_matrix(self, b: int, device) -> torch.Tensor:
        """(B, 4, 4) homogeneous map of RGB values in [-1, 1]."""
        eye = torch.eye(4, device=device).repeat(b, 1, 1)
        m = eye
        vv, k = _luma(device)
        eye3 = torch.eye(3, device=device)

        def where(enabled, mat):
            return torch.where(enabled[:, None, None], mat, eye)
        if self.strength['brightness'] > 0:
            off = torch.randn([b], device=device) * self.brightness_std
            m = where(self._enabled('brightness', b, device), _color_matrix(eye3.repeat(b, 1, 1), off[:, None].repeat(1, 3))) @ m
        if self.strength['contrast'] > 0:
            c = torch.exp2(torch.randn([b], device=device) * self.contrast_std)
            m = where(self._enabled('contrast', b, device), _color_matrix(eye3 * c[:, None, None])) @ m
        if self.strength['lumaflip'] > 0:
            i = torch.randint(2, [b], device=device).float()
            m = where(self._enabled('lumaflip', b, device), _color_matrix(eye3 - 2 * vv * i[:, None, None])) @ m
        if self.strength['hue'] > 0:
            theta = (torch.rand([b], device=device) * 2 - 1) * math.pi * self.hue_max
            # Rodrigues rotation about the luma axis (k: its cross-product matrix).
            rot = eye3 + torch.sin(theta)[:, None, None] * k + (1 - torch.cos(theta))[:, None, None] * (k @ k)
            m = where(self._enabled('hue', b, device), _color_matrix(rot)) @ m
        if self.strength['saturation'] > 0:
            s = torch.exp2(torch.randn([b], device=device) * self.saturation_std)
            m = where(self._enabled('saturation', b, device), _color_matrix(vv + (eye3 - vv) * s[:, None, None])) @ m
        return m

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3k, H, W) in [-1, 1] -> augmented, same shape (differentiable in `images`)."""
        b, ch, h, w = images.shape
        if ch % 3 != 0:
            raise ValueError(f'AugmentPipe: channels must be a multiple of 3 (RGB groups), got {ch}')
        device = images.device
        geo = self.geometric_matrix(b, w, h, device)
        if not torch.equal(geo, torch.eye(3, device=device).expand_as(geo)):
            # Output pixel q samples the input at geo^-1 q.
            # inv_ex: the same inverse without inv's singularity check, a sync on a GPU (the
            # matrices are products of rotations, nonzero scalings and translations).
            inv = torch.linalg.inv_ex(geo).inverse[:, :2, :].to(images.dtype)
            grid = F.affine_grid(inv, [b, ch, h, w], align_corners=False)
            images = grid_sample(images, grid, padding_mode='reflection')     # R1 differentiates its backward
        col = self.color_matrix(b, device).to(images.dtype)
        if not torch.equal(col, torch.eye(4, device=device, dtype=images.dtype).expand_as(col)):
            groups = images.reshape(b, ch // 3, 3, h * w)
            groups = col[:, None, :3, :3] @ groups + col[:, None, :3, 3:]
            images = groups.reshape(b, ch, h, w)
        return images

    def extra_repr(self):
        return ', '.join(f'{k}={v:g}' for k, v in self.strength.items() if v)
