"""StyleGAN2 building blocks (Karras et al. 2020, configs E-F) as EG3D and Next3D use them.

Generator side: FullyConnectedLayer, MappingNetwork, SynthesisLayer, ToRGBLayer,
SynthesisBlock, SynthesisNetwork, Generator. Discriminator side: Conv2dLayer,
DiscriminatorBlock, MinibatchStdLayer, DiscriminatorEpilogue.

Parameter and buffer names are those of the official StyleGAN2/EG3D state dicts
(`mapping.embed`, `mapping.fc{i}`, `mapping.w_avg`, `synthesis.b{res}.{conv0,conv1,torgb}`,
`synthesis.b{res}.conv{0,1}.noise_const`, `synthesis.b4.const`, ...), so official weights
map onto these modules by name.

Mixed precision: blocks flagged `use_fp16` compute in the dtype named by `mixed_precision`
('fp16' as the original, or 'bf16') on CUDA tensors only; on the CPU they run in float32.
"""

import math
from typing import Optional

import torch

from torch_utils import misc
from torch_utils import persistence
from torch_utils.ops import bias_act
from torch_utils.ops import conv2d_resample
from torch_utils.ops import fma
from torch_utils.ops import upfirdn2d

MIXED_PRECISION_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}
NOISE_MODES = ('random', 'const', 'none')


def block_dtype(use_fp16: bool, mixed_precision: str, device: torch.device, force_fp32: bool = False) -> torch.dtype:
    """Compute dtype of a block: the reduced precision only for flagged blocks on CUDA."""
    if use_fp16 and not force_fp32 and device.type == 'cuda':
        return MIXED_PRECISION_DTYPES[mixed_precision]
    return torch.float32


def check_mixed_precision(mixed_precision: str):
    if mixed_precision not in MIXED_PRECISION_DTYPES:
        raise ValueError(f'mixed_precision must be one of {sorted(MIXED_PRECISION_DTYPES)}, got {mixed_precision!r}')


def make_filter(taps) -> torch.Tensor:
    """FIR filter buffer on the current default device (so `with torch.device('meta')` builds work)."""
    return upfirdn2d.setup_filter(list(taps), device=torch.empty(0).device)


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale x to unit mean square along `dim`."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def modulated_conv2d(
    x: torch.Tensor,                        # Input [N, I, H, W].
    weight: torch.Tensor,                   # Weight [O, I, kh, kw].
    styles: torch.Tensor,                   # Per-sample input scales [N, I].
    noise: Optional[torch.Tensor] = None,   # Added to the output (broadcast to [N, O, H', W']), or None.
    up: int = 1,                            # Integer upsampling factor.
    down: int = 1,                          # Integer downsampling factor.
    padding: int = 0,                       # Padding with respect to the upsampled image.
    resample_filter: Optional[torch.Tensor] = None,  # FIR filter from upfirdn2d.setup_filter.
    demodulate: bool = True,                # Normalise each output channel's weight to unit norm?
    flip_weight: bool = True,               # True = correlation (torch's conv2d), False = convolution.
    fused_modconv: bool = True,             # One grouped convolution (True) or scale activations around a shared one.
    gain: float = 1,                        # Scale of the convolution's output (before the noise), folded into the demodulation.
) -> torch.Tensor:
    """StyleGAN2's modulated convolution; returns [N, O, H', W'] in x's dtype."""
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    misc.assert_shape(x, [batch_size, in_channels, None, None], 'modulated_conv2d x')
    misc.assert_shape(styles, [batch_size, in_channels], 'modulated_conv2d styles')

    # Reduced-precision activations can overflow in the weight product: pre-scale both
    # factors (demodulation removes the scale again).
    if x.dtype in (torch.float16, torch.bfloat16) and demodulate:
        weight = weight * (1 / math.sqrt(in_channels * kh * kw) / weight.norm(float('inf'), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float('inf'), dim=1, keepdim=True)

    if gain != 1 and not demodulate:
        weight = weight * gain
    if not fused_modconv:
        dcoefs = demodulation_coefficients(weight, styles) if demodulate else None
        if demodulate and gain != 1:
            dcoefs = dcoefs * gain
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = conv2d_resample.conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding, flip_weight=flip_weight)
        if demodulate and noise is not None:
            x = fma.fma(x, dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1), noise.to(x.dtype))
        elif demodulate:
            x = x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
        elif noise is not None:
            x = x + noise.to(x.dtype)
        return x

    # One grouped convolution with a weight per sample.
    w = weight.unsqueeze(0) * styles.reshape(batch_size, 1, -1, 1, 1)           # [NOIkk]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
        w = w * (dcoefs * gain if gain != 1 else dcoefs).reshape(batch_size, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample.conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding, groups=batch_size, flip_weight=flip_weight)
    x = x.reshape(batch_size, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x


def demodulation_coefficients(weight: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's demodulation: 1 / sqrt(|weight[o] * styles[n]|^2 + 1e-8) per sample and
    output filter, weight [O, I, kh, kw], styles [N, I] -> [N, O]. The squared norm is
    sum_i styles[n, i]^2 sum_k weight[o, i, k]^2, one [N, I] x [I, O] product: the unfused
    convolution never forms the [N, O, I, kh, kw] modulated weights (only the rounding
    differs from summing those)."""
    return (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()


def folds_gain(x: torch.Tensor, activation: str, gain: float) -> bool:
    """Whether a layer scales its convolution (weight or demodulation) by the activation's
    gain instead of passing the gain to bias_act: on the CPU, where bias_act is the
    reference, for activations that commute with a positive gain. Same maths, rounding
    aside; the backward then skips a pass over the gradient (the product with the gain):
    Next3D small128, batch 4, one thread: Gmain 0.99x, Dmain 0.975x the time (medians of 8
    interleaved pairs). bias_act's CUDA kernel scales for free, so elsewhere nothing changes."""
    return x.device.type == 'cpu' and gain != 1 and bias_act.commutes_with_gain(activation, gain)


def cpu_inference(x: torch.Tensor, fused_modconv: bool, *tensors) -> bool:
    """Whether a modulated layer takes its CPU inference path (SynthesisLayer, ToRGBLayer):
    unfused, x float32 on the CPU, and no graph recorded on x or `tensors` (None skipped)."""
    return not fused_modconv and x.device.type == 'cpu' and x.dtype == torch.float32 and not misc.records_graph(x, *tensors)


# ---------------------------------------------------------------------------------------------

@persistence.persistent_class
class FullyConnectedLayer(torch.nn.Module):
    """Dense layer with equalized learning rate: weights stored at N(0, 1/lr_multiplier^2)
    and scaled at run time, so Adam's step size is the same for every layer."""

    def __init__(self,
        in_features: int,               # Number of input features.
        out_features: int,              # Number of output features.
        bias: bool = True,              # Add a bias before the activation?
        activation: str = 'linear',     # Activation of torch_utils.ops.bias_act.
        lr_multiplier: float = 1.0,     # Learning rate multiplier.
        bias_init: float = 0.0,         # Initial bias value.
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == 'linear' and b is not None and x.ndim == 2:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        x = x.matmul(w.t())
        return bias_act.bias_act(x, b, dim=x.ndim - 1, act=self.activation)

    def extra_repr(self):
        return f'in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}'


@persistence.persistent_class
class Conv2dLayer(torch.nn.Module):
    """Plain (unmodulated) convolution with equalized learning rate, optional FIR resampling."""

    def __init__(self,
        in_channels: int,               # Number of input channels.
        out_channels: int,              # Number of output channels.
        kernel_size: int,               # Width and height of the kernel.
        bias: bool = True,              # Add a bias before the activation?
        activation: str = 'linear',     # Activation of torch_utils.ops.bias_act.
        up: int = 1,                    # Integer upsampling factor.
        down: int = 1,                  # Integer downsampling factor.
        resample_filter=(1, 3, 3, 1),   # Low-pass filter taps for resampling.
        conv_clamp: Optional[float] = None,  # Clamp the output to +-conv_clamp, None = no clamp.
        trainable: bool = True,         # False stores weights as buffers (Freeze-D).
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer('resample_filter', make_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.act_gain = bias_act.ACTIVATIONS[activation].gain
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size])
        bias_tensor = torch.zeros([out_channels]) if bias else None
        if trainable:
            self.weight = torch.nn.Parameter(weight)
            self.bias = torch.nn.Parameter(bias_tensor) if bias else None
        else:
            self.register_buffer('weight', weight)
            self.register_buffer('bias', bias_tensor)

    def forward(self, x: torch.Tensor, gain: float = 1) -> torch.Tensor:
        """x [N, in, H, W] -> [N, out, H*up/down, W*up/down] in x's dtype."""
        act_gain = self.act_gain * gain
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        if folds_gain(x, self.activation, act_gain):     # act(conv(x, w) + b) g = act(conv(x, w g) + b g)
            w = self.weight * (self.weight_gain * act_gain)
            b = self.bias.to(x.dtype) * act_gain if self.bias is not None else None
            act_gain = 1
        else:
            w = self.weight * self.weight_gain
            b = self.bias.to(x.dtype) if self.bias is not None else None
        x = conv2d_resample.conv2d_resample(x, w.to(x.dtype), f=self.resample_filter, up=self.up, down=self.down,
                                            padding=self.padding, flip_weight=(self.up == 1))
        return bias_act.bias_act(x, b, act=self.activation, gain=act_gain, clamp=clamp)

    def extra_repr(self):
        return (f'in_channels={self.in_channels}, out_channels={self.out_channels}, activation={self.activation}, '
                f'up={self.up}, down={self.down}')


@persistence.persistent_class
class MappingNetwork(torch.nn.Module):
    """z (+ label c) -> w, broadcast to num_ws copies, with the running mean w_avg for truncation."""

    def __init__(self,
        z_dim: int,                     # Latent z dimensionality, 0 = no latent.
        c_dim: int,                     # Label dimensionality, 0 = no label.
        w_dim: int,                     # Intermediate latent w dimensionality.
        num_ws: Optional[int],          # Number of ws to output, None = do not broadcast.
        num_layers: int = 8,            # Number of mapping layers.
        embed_features: Optional[int] = None,   # Label embedding size, None = w_dim.
        layer_features: Optional[int] = None,   # Hidden layer width, None = w_dim.
        activation: str = 'lrelu',      # Activation of the mapping layers.
        lr_multiplier: float = 0.01,    # Learning rate multiplier of the mapping layers.
        w_avg_beta: Optional[float] = 0.998,    # Decay of the w_avg moving average, None = do not track.
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        embed_features = (w_dim if embed_features is None else embed_features) if c_dim > 0 else 0
        layer_features = w_dim if layer_features is None else layer_features
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            setattr(self, f'fc{idx}', FullyConnectedLayer(features[idx], features[idx + 1], activation=activation, lr_multiplier=lr_multiplier))
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer('w_avg', torch.zeros([w_dim]))

    def forward(self, z: Optional[torch.Tensor], c: Optional[torch.Tensor], truncation_psi: float = 1,
                truncation_cutoff: Optional[int] = None, update_emas: bool = False) -> torch.Tensor:
        """z [N, z_dim], c [N, c_dim] -> ws [N, num_ws, w_dim] float32 ([N, w_dim] if num_ws is None).

        Truncation moves the first `truncation_cutoff` ws (all if None) towards w_avg:
        w_avg + psi * (w - w_avg). `update_emas` updates w_avg with this batch (training only).
        """
        x = None
        if self.z_dim > 0:
            misc.assert_shape(z, [None, self.z_dim], 'mapping z')
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            misc.assert_shape(c, [None, self.c_dim], 'mapping c')
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f'fc{idx}')(x)

        if update_emas and self.w_avg_beta is not None:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])

        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError('MappingNetwork: truncation needs w_avg, but this network was built with w_avg_beta=None')
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = torch.cat([self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi), x[:, truncation_cutoff:]], dim=1)
        return x

    def extra_repr(self):
        return f'z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}'


@persistence.persistent_class
class SynthesisLayer(torch.nn.Module):
    """Modulated 3x3 convolution + noise + bias + leaky ReLU (optionally upsampling x2)."""

    def __init__(self,
        in_channels: int,               # Number of input channels.
        out_channels: int,              # Number of output channels.
        w_dim: int,                     # Intermediate latent w dimensionality.
        resolution: int,                # Output resolution of this layer.
        kernel_size: int = 3,           # Convolution kernel size.
        up: int = 1,                    # Integer upsampling factor.
        use_noise: bool = True,         # Has a noise input (noise_const buffer + noise_strength)?
        activation: str = 'lrelu',      # Activation of torch_utils.ops.bias_act.
        resample_filter=(1, 3, 3, 1),   # Low-pass filter taps for upsampling.
        conv_clamp: Optional[float] = None,  # Clamp the output to +-conv_clamp, None = no clamp.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer('resample_filter', make_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = bias_act.ACTIVATIONS[activation].gain
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer('noise_const', torch.randn([resolution, resolution]))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = 'random', fused_modconv: bool = True, gain: float = 1) -> torch.Tensor:
        """x [N, in, res/up, res/up], w [N, w_dim] -> [N, out, res, res] in x's dtype.

        noise_mode: 'random' (fresh Gaussian noise), 'const' (the stored noise_const) or 'none'.
        """
        if noise_mode not in NOISE_MODES:
            raise ValueError(f'noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}')
        misc.assert_shape(x, [None, self.in_channels, self.resolution // self.up, self.resolution // self.up], 'SynthesisLayer x')
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == 'random':
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * self.noise_strength
        if self.use_noise and noise_mode == 'const':
            noise = self.noise_const * self.noise_strength
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        act_gain = self.act_gain * gain
        if (bias_act.commutes_with_gain(self.activation, act_gain)
                and cpu_inference(x, fused_modconv, styles, self.weight, self.bias, noise)):
            return self._forward_cpu_inference(x, styles, noise, act_gain, clamp)
        bias, out_gain = self.bias.to(x.dtype), 1
        if folds_gain(x, self.activation, act_gain):     # the demodulation scales by the gain
            bias, out_gain, act_gain = bias * act_gain, act_gain, 1
            noise = noise.to(x.dtype) * out_gain if noise is not None else None
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding, resample_filter=self.resample_filter,
                             flip_weight=(self.up == 1), fused_modconv=fused_modconv, gain=out_gain)
        return bias_act.bias_act(x, bias, act=self.activation, gain=act_gain, clamp=clamp)

    def _forward_cpu_inference(self, x: torch.Tensor, styles: torch.Tensor, noise: Optional[torch.Tensor], gain: float,
                               clamp: Optional[float]) -> torch.Tensor:
        """The unfused forward in float32 on the CPU when nothing records a graph: the shared
        convolution of x * styles, then demodulation, noise, bias and gain as one addcmul
        written over the convolution's output, then the activation in place. Three passes
        over the output where modulated_conv2d + bias_act take four, and one new tensor
        where they make three. The same maths for a positive gain (linear, relu and lrelu
        commute with it); only the rounding differs."""
        batch_size = x.shape[0]
        x = x * styles.reshape(batch_size, -1, 1, 1)
        x = conv2d_resample.conv2d_resample(x, self.weight, f=self.resample_filter, up=self.up, padding=self.padding,
                                            flip_weight=(self.up == 1))
        scale = (demodulation_coefficients(self.weight, styles) * gain).reshape(batch_size, -1, 1, 1)
        offset = (self.bias * gain).reshape(1, -1, 1, 1)
        if noise is not None:       # bias + noise [1 or N, O, H, W], laid out as x (a strided one slows addcmul)
            offset = torch.add(offset, noise, alpha=gain, out=torch.empty_like(x[:1] if noise.ndim < 4 or len(noise) == 1 else x))
        x = torch.addcmul(offset, x, scale, out=x)
        x = bias_act.activate_in_place(x, self.activation, bias_act.ACTIVATIONS[self.activation].alpha)
        return x.clamp_(-clamp, clamp) if clamp is not None else x

    def extra_repr(self):
        return (f'in_channels={self.in_channels}, out_channels={self.out_channels}, w_dim={self.w_dim}, '
                f'resolution={self.resolution}, up={self.up}, activation={self.activation}')


@persistence.persistent_class
class ToRGBLayer(torch.nn.Module):
    """Modulated 1x1 convolution without demodulation: features -> output channels."""

    def __init__(self,
        in_channels: int,               # Number of input channels.
        out_channels: int,              # Number of output ("colour") channels.
        w_dim: int,                     # Intermediate latent w dimensionality.
        kernel_size: int = 1,           # Convolution kernel size.
        conv_clamp: Optional[float] = None,  # Clamp the output to +-conv_clamp, None = no clamp.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True, add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, in, H, W], w [N, w_dim] -> [N, out, H, W] in x's dtype; with add_to ([N, out, H, W]
        float32, a tensor of the caller's that may be overwritten), add_to + that in float32."""
        styles = self.affine(w) * self.weight_gain
        if self.weight.shape[-1] == 1 and cpu_inference(x, fused_modconv, styles, self.weight, self.bias, add_to):
            return self._forward_cpu_inference(x, styles, add_to)
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        x = bias_act.bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)
        return x if add_to is None else add_to + x.to(torch.float32)

    def _forward_cpu_inference(self, x: torch.Tensor, styles: torch.Tensor, add_to: Optional[torch.Tensor]) -> torch.Tensor:
        """The 1x1 modulated convolution on the CPU in float32 when nothing records a graph: per
        image one matrix product of the channels-last pixels [H W, in] with the styled weight
        [in, out] (the styles scale the weight, not x), accumulated into add_to in place when
        that is channels last and nothing is clamped, then the bias in one pass (otherwise the
        product with its bias, clamped if asked, is added to add_to in place). torch runs a
        1x1 convolution of a small batch on one thread as its generic kernel, which first
        copies the bias into its output; here neither x * styles nor the sum with add_to
        takes a pass of its own. The same maths; only the rounding differs."""
        batch_size, channels, height, width = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(batch_size, height * width, channels)     # a view of channels-last x
        weight = styles.unsqueeze(2) * self.weight.reshape(self.out_channels, channels).t()    # [N, in, out]
        if add_to is not None and self.conv_clamp is None and add_to.is_contiguous(memory_format=torch.channels_last):
            add_to.permute(0, 2, 3, 1).view(batch_size, height * width, self.out_channels).baddbmm_(rows, weight)
            return add_to.add_(self.bias.reshape(1, -1, 1, 1))
        y = torch.baddbmm(self.bias, rows, weight).view(batch_size, height, width, self.out_channels).permute(0, 3, 1, 2)
        if self.conv_clamp is not None:
            y = y.clamp_(-self.conv_clamp, self.conv_clamp)
        return y if add_to is None else add_to.add_(y)

    def extra_repr(self):
        return f'in_channels={self.in_channels}, out_channels={self.out_channels}, w_dim={self.w_dim}'


@persistence.persistent_class
class SynthesisBlock(torch.nn.Module):
    """One resolution of the StyleGAN2 'skip' generator: [const | conv0 (x up)] -> conv1 -> torgb.

    The image output is the running sum of every block's ToRGB, upsampled with the FIR
    filter. `up=1` gives EG3D's "no-up" block used by the super-resolution modules.
    """

    def __init__(self,
        in_channels: int,               # Number of input channels, 0 = first block (learned constant input).
        out_channels: int,              # Number of output channels.
        w_dim: int,                     # Intermediate latent w dimensionality.
        resolution: int,                # Output resolution of this block.
        img_channels: int,              # Number of output image channels.
        is_last: bool,                  # Last block of the network?
        up: int = 2,                    # Upsampling factor of conv0 and of the image (1 or 2).
        resample_filter=(1, 3, 3, 1),   # Low-pass filter taps for upsampling.
        conv_clamp: Optional[float] = 256,   # Clamp conv outputs to +-conv_clamp, None = no clamp.
        use_fp16: bool = False,         # Compute in reduced precision (CUDA only)?
        mixed_precision: str = 'fp16',  # Reduced precision dtype: 'fp16' or 'bf16'.
        fused_modconv_default='inference_only',  # True, False, or 'inference_only' (fused when not training).
        use_noise: bool = True,         # Noise inputs in the synthesis layers?
    ):
        super().__init__()
        check_mixed_precision(mixed_precision)
        if up not in (1, 2):
            raise ValueError(f'SynthesisBlock: up must be 1 or 2, got {up}')
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.up = up
        self.use_fp16 = use_fp16
        self.mixed_precision = mixed_precision
        self.fused_modconv_default = fused_modconv_default
        self.register_buffer('resample_filter', make_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        layer_kwargs = dict(w_dim=w_dim, resolution=resolution, resample_filter=resample_filter, conv_clamp=conv_clamp, use_noise=use_noise)
        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=up, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, **layer_kwargs)
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
        self.num_torgb += 1

    def forward(self, x: Optional[torch.Tensor], img: Optional[torch.Tensor], ws: torch.Tensor, force_fp32: bool = False,
                fused_modconv=None, update_emas: bool = False, noise_mode: str = 'random'):
        """x [N, in, res/up, res/up] (None for the first block), img [N, img_channels, res/up, res/up]
        float32 or None, ws [N, num_conv + num_torgb, w_dim] -> (x [N, out, res, res] in the
        block's dtype, img [N, img_channels, res, res] float32)."""
        del update_emas     # accepted for interface compatibility; nothing to update here
        misc.assert_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim], f'b{self.resolution} ws')
        w_iter = iter(ws.unbind(dim=1))
        dtype = block_dtype(self.use_fp16, self.mixed_precision, ws.device, force_fp32)
        if fused_modconv is None:
            fused_modconv = self.fused_modconv_default
        if fused_modconv == 'inference_only':
            # On the CPU a batch runs faster as one shared convolution between the style and
            # demodulation scalings than as oneDNN's grouped convolution (18 against 31 ms
            # for 32 channels at 128^2, batch 4, one thread); the two differ only in rounding.
            fused_modconv = not self.training and (ws.device.type != 'cpu' or ws.shape[0] == 1)

        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
        else:
            misc.assert_shape(x, [None, self.in_channels, self.resolution // self.up, self.resolution // self.up], f'b{self.resolution} x')
            x = x.to(dtype)
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)

        if img is not None:
            misc.assert_shape(img, [None, self.img_channels, self.resolution // self.up, self.resolution // self.up], f'b{self.resolution} img')
            if self.up > 1:         # a tensor of this block's: torgb may add to it in place
                img = upfirdn2d.upsample2d(img, self.resample_filter, up=self.up)
                return x, self.torgb(x, next(w_iter), fused_modconv=fused_modconv, add_to=img)
            return x, img + self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
        return x, self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)

    def extra_repr(self):
        return f'resolution={self.resolution}, up={self.up}, use_fp16={self.use_fp16}'


def block_channels(resolution: int, channel_base: int, channel_max: int) -> int:
    """StyleGAN2's channel count at a resolution: min(channel_base / res, channel_max)."""
    return min(channel_base // resolution, channel_max)


def fp16_min_resolution(img_resolution: int, num_fp16_res: int) -> int:
    """Lowest resolution that runs in reduced precision when the top `num_fp16_res` do (never below 8)."""
    return max(2 ** (int(math.log2(img_resolution)) + 1 - num_fp16_res), 8)


@persistence.persistent_class
class SynthesisNetwork(torch.nn.Module):
    """StyleGAN2 'skip' synthesis network: ws [N, num_ws, w_dim] -> image [N, img_channels, res, res]."""

    def __init__(self,
        w_dim: int,                     # Intermediate latent w dimensionality.
        img_resolution: int,            # Output resolution (power of two >= 4).
        img_channels: int,              # Number of output channels.
        channel_base: int = 32768,      # Channels at resolution r: min(channel_base / r, channel_max).
        channel_max: int = 512,         # Maximum number of channels.
        num_fp16_res: int = 0,          # Number of highest resolutions in reduced precision.
        mixed_precision: str = 'fp16',  # Reduced precision dtype: 'fp16' or 'bf16'.
        conv_clamp: Optional[float] = None,  # Clamp conv outputs to +-conv_clamp, None = no clamp.
        fused_modconv_default='inference_only',  # See SynthesisBlock.
        use_noise: bool = True,         # Noise inputs in the synthesis layers?
    ):
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f'SynthesisNetwork: img_resolution must be a power of two >= 4, got {img_resolution}')
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.num_fp16_res = num_fp16_res
        self.block_resolutions = [2 ** i for i in range(2, int(math.log2(img_resolution)) + 1)]
        fp16_res = fp16_min_resolution(img_resolution, num_fp16_res)
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(
                in_channels=block_channels(res // 2, channel_base, channel_max) if res > 4 else 0,
                out_channels=block_channels(res, channel_base, channel_max),
                w_dim=w_dim, resolution=res, img_channels=img_channels, is_last=(res == img_resolution),
                use_fp16=(num_fp16_res > 0 and res >= fp16_res), mixed_precision=mixed_precision,
                conv_clamp=conv_clamp, fused_modconv_default=fused_modconv_default, use_noise=use_noise)
            self.num_ws += block.num_conv
            setattr(self, f'b{res}', block)
        self.num_ws += 1    # the last ToRGB

    def forward(self, ws: torch.Tensor, update_emas: bool = False, noise_mode: str = 'random',
                force_fp32: bool = False, fused_modconv=None) -> torch.Tensor:
        """ws [N, num_ws, w_dim] -> [N, img_channels, img_resolution, img_resolution] float32.

        Block b{res} reads ws[:, i : i + num_conv + 1] where i counts the convs before it, so
        consecutive blocks share one w (a block's ToRGB and the next block's conv0).
        """
        misc.assert_shape(ws, [None, self.num_ws, self.w_dim], 'SynthesisNetwork ws')
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f'b{res}')
            x, img = block(x, img, ws.narrow(1, w_idx, block.num_conv + block.num_torgb), force_fp32=force_fp32,
                           fused_modconv=fused_modconv, noise_mode=noise_mode)
            w_idx += block.num_conv
        return img

    def extra_repr(self):
        return (f'w_dim={self.w_dim}, num_ws={self.num_ws}, img_resolution={self.img_resolution}, '
                f'img_channels={self.img_channels}, num_fp16_res={self.num_fp16_res}')


@persistence.persistent_class
class Generator(torch.nn.Module):
    """StyleGAN2 generator = MappingNetwork + SynthesisNetwork.

    With `with_mapping=False` only the synthesis network is built (Next3D's texture
    generator, driven by ws that another mapping network produces).
    """

    def __init__(self,
        z_dim: int,                     # Latent z dimensionality.
        c_dim: int,                     # Label dimensionality, 0 = unconditional.
        w_dim: int,                     # Intermediate latent w dimensionality.
        img_resolution: int,            # Output resolution.
        img_channels: int,              # Number of output channels.
        mapping_ws: Optional[int] = None,   # ws the mapping broadcasts, None = synthesis.num_ws.
        with_mapping: bool = True,      # Build the mapping network?
        mapping_kwargs: dict = None,    # Arguments of MappingNetwork (num_layers, lr_multiplier, ...).
        synthesis_kwargs: dict = None,  # Arguments of SynthesisNetwork (channel_base, num_fp16_res, ...).
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels, **(synthesis_kwargs or {}))
        self.num_ws = self.synthesis.num_ws
        self.mapping = None
        if with_mapping:
            self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim,
                                          num_ws=self.num_ws if mapping_ws is None else mapping_ws, **(mapping_kwargs or {}))

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1, truncation_cutoff: Optional[int] = None,
                update_emas: bool = False, noise_mode: str = 'random', force_fp32: bool = False, fused_modconv=None) -> torch.Tensor:
        """z [N, z_dim], c [N, c_dim] -> image [N, img_channels, res, res] float32."""
        if self.mapping is None:
            raise RuntimeError('Generator was built with with_mapping=False: call .synthesis(ws) instead')
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, update_emas=update_emas)
        return self.synthesis(ws, update_emas=update_emas, noise_mode=noise_mode, force_fp32=force_fp32, fused_modconv=fused_modconv)


# --- Discriminator parts ------------------------------------------------------------------

@persistence.persistent_class
class DiscriminatorBlock(torch.nn.Module):
    """One resolution of the StyleGAN2 'resnet' discriminator: [fromrgb] -> conv0 -> conv1 (down) + skip."""

    def __init__(self,
        in_channels: int,               # Number of input channels, 0 = first block (reads the image).
        tmp_channels: int,              # Number of intermediate channels.
        out_channels: int,              # Number of output channels.
        resolution: int,                # Input resolution of this block.
        img_channels: int,              # Number of image channels.
        first_layer_idx: int = 0,       # Index of this block's first layer (for Freeze-D).
        activation: str = 'lrelu',      # Activation of the convolutions.
        resample_filter=(1, 3, 3, 1),   # Low-pass filter taps for downsampling.
        conv_clamp: Optional[float] = None,  # Clamp conv outputs to +-conv_clamp, None = no clamp.
        use_fp16: bool = False,         # Compute in reduced precision (CUDA only)?
        mixed_precision: str = 'fp16',  # Reduced precision dtype: 'fp16' or 'bf16'.
        freeze_layers: int = 0,         # Freeze-D: layers with index < freeze_layers are not trained.
    ):
        super().__init__()
        check_mixed_precision(mixed_precision)
        if in_channels not in (0, tmp_channels):
            raise ValueError(f'DiscriminatorBlock: in_channels must be 0 or tmp_channels ({tmp_channels}), got {in_channels}')
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.use_fp16 = use_fp16
        self.mixed_precision = mixed_precision
        self.num_layers = 0

        def trainable():
            idx = first_layer_idx + self.num_layers
            self.num_layers += 1
            return idx >= freeze_layers

        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, activation=activation, conv_clamp=conv_clamp, trainable=trainable())
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, activation=activation, conv_clamp=conv_clamp, trainable=trainable())
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, activation=activation, down=2,
                                 resample_filter=resample_filter, conv_clamp=conv_clamp, trainable=trainable())
        self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                resample_filter=resample_filter, trainable=trainable())

    def forward(self, x: Optional[torch.Tensor], img: Optional[torch.Tensor], force_fp32: bool = False):
        """x [N, in, res, res] or None (first block, then img [N, img_channels, res, res] is read)
        -> (x [N, out, res/2, res/2] in the block's dtype, None)."""
        device = (x if x is not None else img).device
        dtype = block_dtype(self.use_fp16, self.mixed_precision, device, force_fp32)
        if x is not None:
            misc.assert_shape(x, [None, self.in_channels, self.resolution, self.resolution], f'D b{self.resolution} x')
            x = x.to(dtype)
        if self.in_channels == 0:
            misc.assert_shape(img, [None, self.img_channels, self.resolution, self.resolution], f'D b{self.resolution} img')
            y = self.fromrgb(img.to(dtype))
            x = x + y if x is not None else y
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv0(x)
        x = self.conv1(x, gain=math.sqrt(0.5))
        return y + x, None

    def extra_repr(self):
        return f'resolution={self.resolution}, use_fp16={self.use_fp16}'


@persistence.persistent_class
class MinibatchStdLayer(torch.nn.Module):
    """Appends the standard deviation over groups of samples as extra feature channels."""

    def __init__(self,
        group_size: Optional[int],      # Samples per group, None = the whole minibatch.
        num_channels: int = 1,          # Number of appended channels.
    ):
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> [N, C + num_channels, H, W]; N must be divisible by the group size."""
        n, c, h, w = x.shape
        g = min(self.group_size, n) if self.group_size is not None else n
        if n % g != 0:
            raise ValueError(f'MinibatchStdLayer: batch size {n} is not divisible by the group size {g}')
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)       # [G n F c H W]; sample i is in group i % (N/G)
        y = y - y.mean(dim=0)
        y = (y.square().mean(dim=0) + 1e-8).sqrt()  # [n F c H W]
        y = y.mean(dim=[2, 3, 4]).reshape(-1, f, 1, 1)
        y = y.repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)

    def extra_repr(self):
        return f'group_size={self.group_size}, num_channels={self.num_channels}'


@persistence.persistent_class
class DiscriminatorEpilogue(torch.nn.Module):
    """4x4 head of the discriminator: minibatch stddev, conv, fc, output with label projection."""

    def __init__(self,
        in_channels: int,               # Number of input channels.
        cmap_dim: int,                  # Size of the mapped label, 0 = unconditional.
        resolution: int,                # Resolution of this block (4).
        mbstd_group_size: Optional[int] = 4,  # Minibatch stddev group size, None = whole minibatch.
        mbstd_num_channels: int = 1,    # Minibatch stddev channels, 0 = disable.
        activation: str = 'lrelu',      # Activation of the hidden layers.
        conv_clamp: Optional[float] = None,  # Clamp conv outputs to +-conv_clamp, None = no clamp.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.mbstd = MinibatchStdLayer(group_size=mbstd_group_size, num_channels=mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation, conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution ** 2, in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, cmap: Optional[torch.Tensor]) -> torch.Tensor:
        """x [N, in, 4, 4], cmap [N, cmap_dim] or None -> logits [N, 1] float32.

        Conditioning is the projection <out(x), cmap> / sqrt(cmap_dim) (Miyato & Koyama 2018).
        """
        misc.assert_shape(x, [None, self.in_channels, self.resolution, self.resolution], 'D epilogue x')
        x = x.to(torch.float32)
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if self.cmap_dim > 0:
            misc.assert_shape(cmap, [None, self.cmap_dim], 'D epilogue cmap')
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x

    def extra_repr(self):
        return f'resolution={self.resolution}, cmap_dim={self.cmap_dim}'
