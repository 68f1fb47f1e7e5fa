"""The tri-plane decoder: a small MLP from plane features to colour features and density."""

import math

import torch

from torch_utils import misc
from torch_utils import persistence
from training.networks_stylegan2 import FullyConnectedLayer


SIGMOID_GAIN, SIGMOID_OFFSET = 1 + 2 * 0.001, 0.001     # the widened sigmoid: sigmoid * gain - offset, in (-0.001, 1.001)


def widened_sigmoid(x: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """sigmoid(x) * 1.002 - 0.001 (MipNeRF's widened sigmoid), in EG3D's order of operations.

    With `out` (no autograd), in place on the sigmoid's output there."""
    if out is None:
        return torch.sigmoid(x) * SIGMOID_GAIN - SIGMOID_OFFSET
    return torch.sigmoid(x, out=out).mul_(SIGMOID_GAIN).sub_(SIGMOID_OFFSET)


@persistence.persistent_class
class OSGDecoder(torch.nn.Module):
    """Mean of the three plane features -> FC -> softplus -> FC -> (sigma, colour features).

    Both layers have StyleGAN2's equalized learning rate, scaled by `decoder_lr_mul`.

    Colour features go through a sigmoid widened by 0.001 on each side, so that the
    composited image can reach exactly 0 and 1 (-1 and 1 after the renderer's mapping).
    The view direction is accepted for the renderer's interface but not used.
    """

    def __init__(self,
        n_features: int = 32,           # Channels per plane.
        hidden_dim: int = 64,           # Width of the hidden layer.
        decoder_output_dim: int = 32,   # Colour features out (the first 3 are RGB).
        decoder_lr_mul: float = 1.0,    # Learning-rate multiplier of both layers.
    ):
        super().__init__()
        self.n_features = n_features
        self.decoder_output_dim = decoder_output_dim
        self.net = torch.nn.Sequential(
            FullyConnectedLayer(n_features, hidden_dim, lr_multiplier=decoder_lr_mul),
            torch.nn.Softplus(),
            FullyConnectedLayer(hidden_dim, 1 + decoder_output_dim, lr_multiplier=decoder_lr_mul),
        )

    def forward(self, sampled_features: torch.Tensor, ray_directions: torch.Tensor) -> dict:
        """Decode plane samples.

        Args:
            sampled_features: (B, 3, N, n_features) from renderer.sample_from_planes.
            ray_directions:   (B, N, 3), unused.
        Returns:
            dict(rgb=(B, N, decoder_output_dim) in [-0.001, 1.001], sigma=(B, N, 1) raw density).
        """
        misc.assert_shape(sampled_features, [None, 3, None, self.n_features], 'sampled_features')
        return self.forward_plane_mean(sampled_features.mean(dim=1), ray_directions)

    def forward_plane_mean(self, features: torch.Tensor, ray_directions: torch.Tensor) -> dict:
        """Decode the mean of the three planes' samples, features (B, N, n_features) (from
        renderer.sample_plane_mean, which the renderer then uses); see forward."""
        misc.assert_shape(features, [None, None, self.n_features], 'features')
        batch_size, num_points, channels = features.shape
        x = features.reshape(batch_size * num_points, channels)
        if x.device.type == 'cpu':
            fc0, fc2 = self.net[0], self.net[2]
            params = (*_effective_params(fc0, x.dtype), *_effective_params(fc2, x.dtype))
            keep = misc.records_graph(x, *params)
            sigma, rgb = _DecodeCPU.apply(x, *params, keep)
        else:
            out = self.net(x)                                                    # 2D: one addmm per layer
            # split (not two slices): its backward writes the gradient once, without zero-filled copies.
            sigma, rgb = out.split([1, out.shape[1] - 1], dim=1)
            rgb = widened_sigmoid(rgb)
        return dict(rgb=rgb.reshape(batch_size, num_points, -1), sigma=sigma.reshape(batch_size, num_points, 1))


def _effective_params(layer: FullyConnectedLayer, dtype: torch.dtype):
    """A FullyConnectedLayer's weight and bias as its forward applies them (learning-rate gains folded in)."""
    return layer.weight.to(dtype) * layer.weight_gain, layer.bias.to(dtype) * layer.bias_gain


LOG2_E = 1 / math.log(2)


def softplus_cpu(pre: torch.Tensor, out: torch.Tensor, bias: torch.Tensor = None, log_exp: bool = None) -> torch.Tensor:
    """softplus (beta 1) of pre (+ bias, broadcast along the last dimension) into out (which
    may be pre), by the faster of two formulas for this CPU:

    - `log_exp` (default: misc.mkl_vector_math_fast(), i.e. Intel CPUs): log(1 + e^pre),
      MKL's exp and log. Within 1.3e-7 max(1, softplus) of float64's (torch's float32:
      8.4e-8), so below -17, where 1 + e^pre rounds to 1, it is 0 (within 4.2e-8). On an
      Intel Xeon (one thread) 0.70 against 1.20 ns a value for the other formula.
    - else log1p(2^(pre log2 e)): torch's exp2 and log1p, which are not MKL's; on AMD EPYC
      exp2 was about 3x faster than exp (1.2 against 1.5 ns a value for the whole
      softplus). Relative error below 1e-6 from pre = -20 (torch's: 1.2e-7), absolute
      below 1e-14 under -20.

    Above torch's threshold of 20, where torch returns pre itself, both are within 2e-7 of
    it, up to where e^pre overflows float32 (pre above ~88.72): there they return inf,
    and a NaN stays NaN. The caller decides what to do with those (_DecodeCPU redoes them
    with torch's softplus); torch.compile gets torch's own (no branch on a value there).
    The bias joins the first pass (torch.add), so that the caller's matrix product needs
    no bias (an addmm first copies its bias into the output: a pass of its own)."""
    if torch.compiler.is_compiling():
        return torch_softplus(pre, out, bias)
    use_log_exp = misc.mkl_vector_math_fast() if log_exp is None else log_exp
    if use_log_exp:
        if bias is None:
            torch.exp(pre, out=out)
        else:
            torch.add(pre, bias, out=out).exp_()
        return out.add_(1).log_()
    if bias is None:
        torch.mul(pre, LOG2_E, out=out)
    else:
        torch.add(bias * LOG2_E, pre, alpha=LOG2_E, out=out)
    return out.exp2_().log1p_()


def torch_softplus(pre: torch.Tensor, out: torch.Tensor, bias: torch.Tensor = None) -> torch.Tensor:
    """torch's softplus (beta 1, threshold 20) of pre (+ bias) into out, with softplus_cpu's arguments."""
    if bias is not None:
        pre = pre.add_(bias) if out is pre else pre + bias
    return torch.ops.aten.softplus.out(pre, 1, 20, out=out)


class _DecodeCPU(torch.autograd.Function):
    """OSGDecoder's MLP on the CPU, a few thousand points at a time, forward and backward:
    each chunk's hidden activations (twice as wide as the input) stay in the CPU's cache,
    about twice as fast as whole-tensor operations there. When a backward will follow
    (`keep`), the forward keeps the hidden layer and softplus' derivative there (M, H each),
    and the backward reads the colour sigmoid's derivative off the colour: no second pass
    through the layers (forward + backward of 98,304 points, one thread: 0.74x the time of
    recomputing them). softplus' derivative is sigmoid(pre) also above torch's linear
    threshold (20), where it is 1 in float32 and 1 - 2e-9 in float64.

    x (M, C), w1 (H, C), b1 (H,), w2 (1 + D, H), b2 (1 + D,), keep (bool) -> sigma (M, 1), rgb (M, D)."""

    CHUNK = 4096

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, keep: bool):
        sigma = x.new_empty(len(x), 1)
        rgb = x.new_empty(len(x), w2.shape[0] - 1)
        if keep:
            hidden, slope = x.new_empty(len(x), w1.shape[0]), x.new_empty(len(x), w1.shape[0])
        # The output layer as a matrix-vector product for sigma and a 32-wide product for
        # the colours, written in place: faster than one 33-wide product and two copies.
        w1_t, w_sigma, b_sigma, w_rgb_t, b_rgb = w1.t(), w2[0], b2[:1], w2[1:].t(), b2[1:]

        def run(rows, softplus):
            if keep:
                pre = torch.addmm(b1, x[rows], w1_t)
                torch.sigmoid(pre, out=slope[rows])                          # softplus' derivative
                hidden_chunk = softplus(pre, hidden[rows])
            else:                                                            # the bias joins softplus' first pass
                pre = torch.mm(x[rows], w1_t)
                hidden_chunk = softplus(pre, pre, b1)
            torch.addmv(b_sigma, hidden_chunk, w_sigma, out=sigma[rows, 0])
            rgb_chunk = torch.mm(hidden_chunk, w_rgb_t, out=rgb[rows]).add_(b_rgb)   # not addmm: see softplus_cpu's bias
            widened_sigmoid(rgb_chunk, out=rgb_chunk)

        chunks = [slice(i, i + _DecodeCPU.CHUNK) for i in range(0, len(x), _DecodeCPU.CHUNK)]
        for rows in chunks:
            run(rows, softplus_cpu)
        # Where softplus_cpu overflowed (inf) or met a NaN, sigma is not finite (inf times a
        # weight, or 0 * inf = NaN): those chunks again with torch's softplus. One check of
        # sigma's sum, which is finite when every value is (98,304 values: 8 against 390 us
        # for isfinite().all(); a sum that overflows only makes the chunks be checked below).
        if not math.isfinite(float(sigma.sum())):
            for rows in chunks:
                if not bool(torch.isfinite(sigma[rows]).all()):
                    run(rows, torch_softplus)
        if keep:
            ctx.save_for_backward(x, w1, w2, hidden, slope, rgb)
        return sigma, rgb

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sigma, grad_rgb):             # (autograd passes zeros for an unused output)
        x, w1, w2, hidden, slope, rgb = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        grad_x = torch.empty_like(x) if need_x else None
        grad_w1, grad_w2 = torch.zeros_like(w1), torch.zeros_like(w2)
        grad_b1, grad_b2 = w1.new_zeros(w1.shape[0]), w2.new_zeros(w2.shape[0])
        for i in range(0, len(x), _DecodeCPU.CHUNK):
            rows = slice(i, i + _DecodeCPU.CHUNK)
            x_chunk, hidden_chunk = x[rows], hidden[rows]
            grad_out = torch.empty(len(x_chunk), w2.shape[0], dtype=x.dtype)
            grad_out[:, :1] = grad_sigma[rows]
            # widened sigmoid: d rgb / d logit = GAIN * s * (1 - s), s = (rgb + OFFSET) / GAIN
            s = rgb[rows].add(SIGMOID_OFFSET).div_(SIGMOID_GAIN)
            torch.ops.aten.sigmoid_backward.grad_input(grad_rgb[rows] * SIGMOID_GAIN, s, grad_input=grad_out[:, 1:])
            grad_w2.addmm_(grad_out.t(), hidden_chunk)
            grad_b2 += grad_out.sum(0)
            grad_hidden = grad_out.mm(w2).mul_(slope[rows])
            if need_w1:
                grad_w1.addmm_(grad_hidden.t(), x_chunk)
            grad_b1 += grad_hidden.sum(0)
            if need_x:
                torch.mm(grad_hidden, w1, out=grad_x[rows])
        return (grad_x, grad_w1 if need_w1 else None, grad_b1 if need_b1 else None,
                grad_w2 if need_w2 else None, grad_b2 if need_b2 else None, None)
