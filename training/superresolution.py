"""Super-resolution of the neural rendering (EG3D's "hybrid" SR modules).

The raw feature image (first 3 channels = RGB) is resized to an input resolution and run
through two StyleGAN2 synthesis blocks driven by the last w (repeated), whose skip output
starts from the raw RGB:

    factor 8 (e.g. 64 -> 512): resize to R/4, block0 upsamples to R/2, block1 to R;
                               channels 256 and 128 (EG3D's SuperresolutionHybrid8XDC).
    factor 4 (e.g. 64 -> 256) and
    factor 2 (e.g. 64 -> 128): resize to R/2, block0 keeps R/2, block1 upsamples to R;
                               channels 128 and 64 (SuperresolutionHybrid4X / 2X).

Parameter names (`block0`, `block1`, ...) are EG3D's.
"""

import torch

from torch_utils import misc
from torch_utils import persistence
from training.networks_stylegan2 import SynthesisBlock

SR_LAYOUTS = {
    # factor: (input resolution = img_resolution // divisor, block0 upsampling, default channels)
    8: (4, 2, (256, 128)),
    4: (2, 1, (128, 64)),
    2: (2, 1, (128, 64)),
}


def sr_factor(img_resolution: int, neural_rendering_resolution: int) -> int:
    """The SR factor for an output / neural rendering resolution pair (2, 4 or 8)."""
    factor = img_resolution // neural_rendering_resolution
    if factor not in SR_LAYOUTS or factor * neural_rendering_resolution != img_resolution:
        raise ValueError(f'no super-resolution module for {neural_rendering_resolution} -> {img_resolution} '
                         f'(supported factors: {sorted(SR_LAYOUTS)})')
    return factor


@persistence.persistent_class
class SuperResolution(torch.nn.Module):
    """Raw rendering (features [N, C, r, r]) -> image [N, 3, R, R] float32."""

    def __init__(self,
        channels: int,                  # Channels of the feature image (32).
        img_resolution: int,            # Output resolution R.
        factor: int = 8,                # 8, 4 or 2: selects the layout (see the module docstring).
        w_dim: int = 512,               # Intermediate latent w dimensionality.
        block_channels=None,            # (block0, block1) channels, None = EG3D's for the factor.
        num_fp16_res: int = 4,          # > 0: both blocks in reduced precision on CUDA (EG3D's sr_num_fp16_res).
        mixed_precision: str = 'fp16',  # Reduced precision dtype: 'fp16' or 'bf16'.
        antialias: bool = True,         # Antialiased resize of the input (EG3D's sr_antialias).
        img_channels: int = 3,          # Output channels.
        fused_modconv_default='inference_only',  # See SynthesisBlock.
    ):
        super().__init__()
        if factor not in SR_LAYOUTS:
            raise ValueError(f'SuperResolution: factor must be one of {sorted(SR_LAYOUTS)}, got {factor}')
        divisor, up0, default_channels = SR_LAYOUTS[factor]
        ch0, ch1 = default_channels if block_channels is None else block_channels
        use_fp16 = num_fp16_res > 0
        self.channels = channels
        self.img_resolution = img_resolution
        self.input_resolution = img_resolution // divisor
        self.antialias = antialias
        common = dict(w_dim=w_dim, img_channels=img_channels, use_fp16=use_fp16, mixed_precision=mixed_precision,
                      conv_clamp=(256 if use_fp16 else None), fused_modconv_default=fused_modconv_default)
        self.block0 = SynthesisBlock(channels, ch0, resolution=self.input_resolution * up0, is_last=False, up=up0, **common)
        self.block1 = SynthesisBlock(ch0, ch1, resolution=img_resolution, is_last=True, up=2, **common)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, ws: torch.Tensor, noise_mode: str = 'none',
                force_fp32: bool = False, fused_modconv=None) -> torch.Tensor:
        """rgb [N, 3, r, r], x [N, channels, r, r] (features incl. rgb), ws [N, num_ws, w_dim] (the
        last one is used) -> [N, 3, img_resolution, img_resolution] float32."""
        misc.assert_shape(x, [None, self.channels, None, None], 'SuperResolution x')
        ws = ws[:, -1:, :].repeat(1, 3, 1)
        if x.shape[-1] != self.input_resolution:
            size = (self.input_resolution, self.input_resolution)
            x = torch.nn.functional.interpolate(x, size=size, mode='bilinear', align_corners=False, antialias=self.antialias)
            rgb = torch.nn.functional.interpolate(rgb, size=size, mode='bilinear', align_corners=False, antialias=self.antialias)
        kwargs = dict(noise_mode=noise_mode, force_fp32=force_fp32, fused_modconv=fused_modconv)
        x, rgb = self.block0(x, rgb, ws, **kwargs)
        x, rgb = self.block1(x, rgb, ws, **kwargs)
        return rgb

    def extra_repr(self):
        return f'channels={self.channels}, input_resolution={self.input_resolution}, img_resolution={self.img_resolution}'
