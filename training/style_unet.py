"""StyleUNet: an image-to-image StyleGAN2 generator (Next3D's mouth and neural-blending nets).

An encoder of residual-free downsampling blocks reads the input feature image at every
scale (each block adds a 1x1 projection of the input image, resized to its resolution,
to the features from the previous block) and produces features at in/2, in/4, ...,
down to the bottleneck. The decoder is the upper part of a StyleGAN2 'skip' synthesis
network, starting from the bottleneck instead of a learned constant:

    x = fusion[0](e_bottleneck)                         # 3x3 conv
    for each decoder block b{2r} (r = bottleneck .. out/2):
        if r > bottleneck and the encoder has features at r:
            x = fusion[k](cat(x, e_r))                  # 3x3 conv, 2C -> C
        x, img = b{2r}(x, img, ws[block's slice])
    return img                                          # sum of ToRGBs, out_channels

Every encoder scale is fused. Next3D's two instances (channel_base 32768, channel_max 512):
    mouth:    in 64, bottleneck 4, out 256: fused at 4/8/16/32, blocks b8..b256.
    blending: in 256, bottleneck 32, out 256: fused at 32/64/128, blocks b64..b256.
Only the parts that run are built (the original also held an unused b4 / extra fusion).

ws are the full eg3d ws [N, 2 log2(out) - 2, w_dim] of a StyleGAN2 generator at the output
resolution; block b{res} reads the slice it would read in that generator.
Names follow the official state dict without its `synthesis.` level: official
`mouth_backbone.synthesis.encoder.0.conv1.weight` is our `mouth_backbone.encoder.0.conv1.weight`.
"""

import math
from typing import Optional

import torch

from torch_utils import misc
from torch_utils import persistence
from torch_utils.ops import upfirdn2d
from training.networks_stylegan2 import Conv2dLayer
from training.networks_stylegan2 import SynthesisBlock
from training.networks_stylegan2 import block_channels
from training.networks_stylegan2 import check_mixed_precision
from training.networks_stylegan2 import fp16_min_resolution
from training.networks_stylegan2 import make_filter


@persistence.persistent_class
class EncoderBlock(torch.nn.Module):
    """One encoder scale: [downsample image] -> fromrgb (+ previous features) -> conv -> conv (down x2)."""

    def __init__(self,
        img_channels: int,              # Channels of the input image.
        in_channels: int,               # Feature channels at this block's resolution.
        out_channels: int,              # Feature channels after downsampling.
        downsample_image: bool,         # Halve the image first (False for the first block)?
        resample_filter=(1, 3, 3, 1),   # Low-pass filter taps for resampling.
    ):
        super().__init__()
        self.downsample_image = downsample_image
        self.register_buffer('resample_filter', make_filter(resample_filter))
        self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, bias=False)
        self.conv1 = Conv2dLayer(in_channels, in_channels, kernel_size=3, activation='lrelu')
        self.conv2 = Conv2dLayer(in_channels, out_channels, kernel_size=3, down=2, activation='lrelu', resample_filter=resample_filter)

    def forward(self, image: torch.Tensor, features: Optional[torch.Tensor]):
        """image [N, img_channels, H, W] (2H x 2W if downsample_image), features [N, in, H, W] or None
        -> (image at H x W, features [N, out, H/2, W/2])."""
        if self.downsample_image:
            image = upfirdn2d.downsample2d(image, self.resample_filter)
        x = self.fromrgb(image)
        if features is not None:
            x = x + features
        x = self.conv2(self.conv1(x))
        return image, x


@persistence.persistent_class
class StyleUNet(torch.nn.Module):
    """Feature image [N, in_channels, in_res, in_res] + ws -> [N, out_channels, out_res, out_res] float32."""

    def __init__(self,
        in_channels: int,               # Channels of the input image (32: a rendered neural texture).
        out_channels: int,              # Channels of the output image.
        in_resolution: int,             # Input resolution.
        bottleneck_resolution: int,     # Lowest encoder resolution; the decoder starts here.
        out_resolution: int,            # Output resolution.
        w_dim: int = 512,               # Intermediate latent w dimensionality.
        channel_base: int = 32768,      # Channels at resolution r: min(channel_base / r, channel_max).
        channel_max: int = 512,         # Maximum number of channels.
        num_fp16_res: int = 0,          # Highest decoder resolutions in reduced precision (CUDA only).
        mixed_precision: str = 'fp16',  # Reduced precision dtype: 'fp16' or 'bf16'.
        conv_clamp: Optional[float] = None,  # Clamp decoder conv outputs to +-conv_clamp.
        fused_modconv_default='inference_only',  # See SynthesisBlock.
        use_noise: bool = True,         # Noise inputs in the decoder?
    ):
        super().__init__()
        check_mixed_precision(mixed_precision)
        for name, res in (('in_resolution', in_resolution), ('bottleneck_resolution', bottleneck_resolution), ('out_resolution', out_resolution)):
            if res < 4 or res & (res - 1):
                raise ValueError(f'StyleUNet: {name} must be a power of two >= 4, got {res}')
        if not bottleneck_resolution < in_resolution or not bottleneck_resolution < out_resolution:
            raise ValueError(f'StyleUNet: the bottleneck ({bottleneck_resolution}) must be below the input ({in_resolution}) and output ({out_resolution}) resolutions')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.in_resolution = in_resolution
        self.bottleneck_resolution = bottleneck_resolution
        self.out_resolution = out_resolution
        self.w_dim = w_dim
        self.num_ws = 2 * int(math.log2(out_resolution)) - 2
        ch = lambda res: block_channels(res, channel_base, channel_max)

        # Encoder: input res -> bottleneck; block i reads resolution in_res / 2^i.
        enc_res = [in_resolution // 2 ** i for i in range(int(math.log2(in_resolution // bottleneck_resolution)))]
        self.encoder = torch.nn.ModuleList([
            EncoderBlock(in_channels, ch(res), ch(res // 2), downsample_image=(res < in_resolution)) for res in enc_res])
        # Feature resolutions the decoder fuses, bottleneck first (those below the output).
        self.fused_resolutions = [res // 2 for res in reversed(enc_res) if res // 2 < out_resolution]
        self.fusion = torch.nn.ModuleList([
            Conv2dLayer(ch(res) * (1 if k == 0 else 2), ch(res), kernel_size=3) for k, res in enumerate(self.fused_resolutions)])

        # Decoder: StyleGAN2 blocks from 2 x bottleneck to the output.
        self.block_resolutions = [2 ** i for i in range(int(math.log2(bottleneck_resolution)) + 1, int(math.log2(out_resolution)) + 1)]
        fp16_res = fp16_min_resolution(out_resolution, num_fp16_res)
        for res in self.block_resolutions:
            setattr(self, f'b{res}', SynthesisBlock(
                ch(res // 2), ch(res), w_dim=w_dim, resolution=res, img_channels=out_channels, is_last=(res == out_resolution),
                use_fp16=(num_fp16_res > 0 and res >= fp16_res), mixed_precision=mixed_precision, conv_clamp=conv_clamp,
                fused_modconv_default=fused_modconv_default, use_noise=use_noise))

    def forward(self, image: torch.Tensor, ws: torch.Tensor, noise_mode: str = 'random', force_fp32: bool = False,
                fused_modconv=None, update_emas: bool = False) -> torch.Tensor:
        """image [N, in_channels, in_res, in_res], ws [N, num_ws, w_dim] -> [N, out_channels, out_res, out_res] float32."""
        del update_emas
        misc.assert_shape(image, [None, self.in_channels, self.in_resolution, self.in_resolution], 'StyleUNet image')
        misc.assert_shape(ws, [image.shape[0], self.num_ws, self.w_dim], 'StyleUNet ws')
        ws = ws.to(torch.float32)
        features = {}
        e = None
        for block in self.encoder:
            image, e = block(image, e)
            features[e.shape[-1]] = e

        x = img = None
        for res in self.block_resolutions:
            r = res // 2
            if r in self.fused_resolutions:
                k = self.fused_resolutions.index(r)
                x = self.fusion[k](features[r]) if k == 0 else self.fusion[k](torch.cat([x.to(torch.float32), features[r]], dim=1))
            w_idx = 2 * int(math.log2(res)) - 5      # ws before block b{res} in a full StyleGAN2 synthesis network
            block = getattr(self, f'b{res}')
            x, img = block(x, img, ws.narrow(1, w_idx, block.num_conv + block.num_torgb), force_fp32=force_fp32,
                           fused_modconv=fused_modconv, noise_mode=noise_mode)
        return img

    def extra_repr(self):
        return (f'in_resolution={self.in_resolution}, bottleneck_resolution={self.bottleneck_resolution}, '
                f'out_resolution={self.out_resolution}, fused_resolutions={self.fused_resolutions}')
