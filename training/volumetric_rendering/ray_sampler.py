"""One ray per pixel of a pinhole camera.

Conventions (see training/coords.py): OpenCV camera, x right, y down, z forward; the
intrinsics are normalised by the image size, so pixel (row i, column j) of an R x R image
has its centre at normalised image coordinates ((j + 0.5) / R, (i + 0.5) / R).
"""

import torch

from torch_utils import misc


class RaySampler(torch.nn.Module):
    """Cameras -> one ray per pixel centre, row-major (rows follow image y). No parameters."""

    def forward(self, cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int):
        """Rays through the pixel centres of a `resolution` x `resolution` image.

        Args:
            cam2world:  (B, 4, 4) float, OpenCV camera-to-world matrices, world units.
            intrinsics: (B, 3, 3) float, normalised by the image size
                        ([[fx, skew, cx], [0, fy, cy], [0, 0, 1]]).
            resolution: image side R in pixels.
        Returns:
            ray_origins:    (B, R * R, 3) camera centres in world units.
            ray_directions: (B, R * R, 3) unit vectors in world space; ray k is pixel
                            (row k // R, column k % R).
        """
        misc.assert_shape(cam2world, [None, 4, 4], 'cam2world')
        batch_size = cam2world.shape[0]
        misc.assert_shape(intrinsics, [batch_size, 3, 3], 'intrinsics')
        if int(resolution) < 1:
            raise ValueError(f'RaySampler: resolution must be a positive integer, got {resolution!r}')
        resolution = int(resolution)

        centres = (torch.arange(resolution, device=cam2world.device, dtype=cam2world.dtype) + 0.5) / resolution
        v, u = torch.meshgrid(centres, centres, indexing='ij')      # v: rows (y), u: columns (x)
        u, v = u.reshape(1, -1), v.reshape(1, -1)                    # (1, R*R)

        fx, fy = intrinsics[:, 0, 0:1], intrinsics[:, 1, 1:2]
        cx, cy, skew = intrinsics[:, 0, 2:3], intrinsics[:, 1, 2:3], intrinsics[:, 0, 1:2]
        y_cam = (v - cy) / fy                                         # invert u = fx x + skew y + cx
        x_cam = (u - cx - skew * y_cam) / fx
        dirs_cam = torch.stack([x_cam, y_cam, torch.ones_like(x_cam)], dim=-1)   # (B, R*R, 3) at depth 1

        rotation = cam2world[:, :3, :3]
        ray_directions = torch.nn.functional.normalize(dirs_cam @ rotation.transpose(1, 2), dim=-1)
        ray_origins = cam2world[:, None, :3, 3].expand(-1, resolution * resolution, -1)
        return ray_origins, ray_directions
