"""EG3D's dual discriminator: judges the final image and the raw neural rendering together.

`image_raw` is upsampled to the final resolution with an antialiased bilinear filter and
stacked with `image` into 6 channels, so D sees whether the super-resolved image is
consistent with the low-resolution rendering. Conditioning on the camera (and expression)
label goes through a mapping network and the epilogue's projection.
"""

import math
from typing import Optional

import torch

from torch_utils import misc
from torch_utils import persistence
from training.networks_stylegan2 import DiscriminatorBlock
from training.networks_stylegan2 import DiscriminatorEpilogue
from training.networks_stylegan2 import MappingNetwork
from training.networks_stylegan2 import block_channels
from training.networks_stylegan2 import check_mixed_precision
from training.networks_stylegan2 import fp16_min_resolution


def filtered_resizing(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize [N, C, H, W] to [N, C, size, size] with antialiased bilinear filtering.

    EG3D's default ('antialiased') resampling for image_raw in D and for downsampling real
    images to the neural rendering resolution; use it wherever images change resolution
    between G and D so reals and fakes see the same filter.
    """
    if image.shape[-2:] == (size, size):
        return image
    return torch.nn.functional.interpolate(image, size=(size, size), mode='bilinear', align_corners=False, antialias=True)


@persistence.persistent_class
class DualDiscriminator(torch.nn.Module):
    """StyleGAN2 ResNet discriminator on [image, upsampled image_raw] (6 channels), label-conditioned."""

    def __init__(self,
        c_dim: int,                     # Label dimensionality (25 camera, + expression values), 0 = unconditional.
        img_resolution: int,            # Resolution of `image`.
        img_channels: int = 3,          # Channels of `image` and of `image_raw` each.
        channel_base: int = 32768,      # Channels at resolution r: min(channel_base / r, channel_max).
        channel_max: int = 512,         # Maximum number of channels.
        num_fp16_res: int = 4,          # Number of highest resolutions in reduced precision (CUDA only).
        mixed_precision: str = 'fp16',  # Reduced precision dtype: 'fp16' or 'bf16'.
        conv_clamp: Optional[float] = 256,   # Clamp conv outputs to +-conv_clamp, None = no clamp.
        cmap_dim: Optional[int] = None, # Size of the mapped label, None = channels at 4x4.
        disc_c_noise: float = 0.0,      # Add disc_c_noise x std(c over the batch) Gaussian noise to the label.
        mapping_layers: int = 8,        # Layers of the label mapping network.
        mbstd_group_size: Optional[int] = 4,  # Minibatch stddev group size.
        mbstd_num_channels: int = 1,    # Minibatch stddev channels.
        freeze_layers: int = 0,         # Freeze-D: number of leading layers that are not trained.
    ):
        super().__init__()
        check_mixed_precision(mixed_precision)
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.disc_c_noise = disc_c_noise
        self.block_resolutions = [2 ** i for i in range(int(math.log2(img_resolution)), 2, -1)]
        ch = lambda res: block_channels(res, channel_base, channel_max)
        if cmap_dim is None:
            cmap_dim = ch(4)
        if c_dim == 0:
            cmap_dim = 0
        fp16_res = fp16_min_resolution(img_resolution, num_fp16_res)
        layer_idx = 0
        for res in self.block_resolutions:
            block = DiscriminatorBlock(
                in_channels=ch(res) if res < img_resolution else 0, tmp_channels=ch(res), out_channels=ch(res // 2),
                resolution=res, img_channels=img_channels * 2, first_layer_idx=layer_idx,
                conv_clamp=conv_clamp, use_fp16=(num_fp16_res > 0 and res >= fp16_res), mixed_precision=mixed_precision,
                freeze_layers=freeze_layers)
            setattr(self, f'b{res}', block)
            layer_idx += block.num_layers
        if c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None, num_layers=mapping_layers)
        self.b4 = DiscriminatorEpilogue(ch(4), cmap_dim=cmap_dim, resolution=4, mbstd_group_size=mbstd_group_size,
                                        mbstd_num_channels=mbstd_num_channels, conv_clamp=conv_clamp)

    def forward(self, img: dict, c: torch.Tensor, update_emas: bool = False, force_fp32: bool = False) -> torch.Tensor:
        """img = dict(image [N, C, R, R], image_raw [N, C, r, r]), c [N, c_dim] -> logits [N, 1] float32."""
        del update_emas     # nothing to update; accepted for EG3D's interface
        image = img['image']
        misc.assert_shape(image, [None, self.img_channels, self.img_resolution, self.img_resolution], 'D image')
        misc.assert_shape(img['image_raw'], [image.shape[0], self.img_channels, None, None], 'D image_raw')
        x = torch.cat([image, filtered_resizing(img['image_raw'], self.img_resolution)], dim=1)
        x, rgb = None, x
        for res in self.block_resolutions:
            x, rgb = getattr(self, f'b{res}')(x, rgb, force_fp32=force_fp32)
        cmap = None
        if self.c_dim > 0:
            misc.assert_shape(c, [image.shape[0], self.c_dim], 'D label c')
            if self.disc_c_noise > 0:
                c = c + torch.randn_like(c) * c.std(0) * self.disc_c_noise
            cmap = self.mapping(None, c)
        return self.b4(x, cmap)

    def extra_repr(self):
        return f'c_dim={self.c_dim}, img_resolution={self.img_resolution}, img_channels={self.img_channels}'
