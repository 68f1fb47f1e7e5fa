"""StyleGAN2 layers, dual discriminator, super-resolution and StyleUNet (CPU, tiny sizes)."""

import math

import pytest
import torch
import torch.nn.functional as F

from training import configs
from training.networks_stylegan2 import Generator
from training.networks_stylegan2 import MappingNetwork
from training.networks_stylegan2 import MinibatchStdLayer
from training.networks_stylegan2 import SynthesisLayer
from training.networks_stylegan2 import ToRGBLayer
from training.networks_stylegan2 import demodulation_coefficients
from training.networks_stylegan2 import modulated_conv2d
from training.style_unet import StyleUNet
from training.superresolution import SuperResolution
from training.superresolution import sr_factor


def count(module):
    return sum(p.numel() for p in module.parameters())


# --- modulated convolution -------------------------------------------------------------------

def test_modulated_conv2d_matches_per_sample_reference():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    styles = torch.rand(3, 4, dtype=torch.float64) + 0.5
    noise = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    expected = []
    for i in range(3):      # the definition: scale input channels, normalise each output filter, convolve
        w = weight * styles[i].reshape(1, -1, 1, 1)
        w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        expected.append(F.conv2d(x[i:i + 1], w, padding=1))
    expected = torch.cat(expected) + noise
    for fused in (True, False):
        out = modulated_conv2d(x, weight, styles, noise=noise, padding=1, fused_modconv=fused)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('batch, fused_expected', [(4, False), (1, True)])
def test_inference_modconv_choice_on_cpu(monkeypatch, batch, fused_expected):
    # 'inference_only' on the CPU: a batch runs as one shared convolution (oneDNN's grouped
    # convolution is slower there), a single image as the fused one; training never fuses.
    from training import networks_stylegan2
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3,
                  mapping_kwargs=dict(num_layers=1), synthesis_kwargs=dict(channel_base=64, channel_max=8))
    ws = G.mapping(torch.randn(batch, 8), None)
    seen = []
    original = networks_stylegan2.modulated_conv2d
    monkeypatch.setattr(networks_stylegan2, 'modulated_conv2d', lambda *a, **k: seen.append(k['fused_modconv']) or original(*a, **k))
    G.eval()
    out = G.synthesis(ws, noise_mode='const')
    assert seen and set(seen) == {fused_expected}
    for fused in (True, False):         # the choice changes only the rounding
        torch.testing.assert_close(G.synthesis(ws, noise_mode='const', fused_modconv=fused), out, rtol=1e-5, atol=1e-5)
    seen.clear()
    G.train()
    G.synthesis(ws, noise_mode='const')
    assert set(seen) == {False}


def test_modulated_conv2d_without_demodulation_is_a_scaled_conv():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    weight = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    styles = torch.randn(2, 3, dtype=torch.float64)
    out = modulated_conv2d(x, weight, styles, demodulate=False)
    expected = torch.einsum('oi,ni,nihw->nohw', weight[:, :, 0, 0], styles, x)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize('demodulate', [True, False])
@pytest.mark.parametrize('fused', [True, False])
def test_modulated_conv2d_gain_scales_the_convolution_before_the_noise(demodulate, fused):
    """gain (folded into the demodulation, or into the weight without one) scales the
    convolution's output; the noise is added after, unscaled."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    styles = torch.randn(2, 3, dtype=torch.float64)
    noise = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    kwargs = dict(demodulate=demodulate, padding=1, fused_modconv=fused)
    plain = modulated_conv2d(x, weight, styles, **kwargs)
    got = modulated_conv2d(x, weight, styles, noise=noise, gain=2.5, **kwargs)
    torch.testing.assert_close(got, plain * 2.5 + noise, rtol=1e-12, atol=1e-12)


def test_demodulation_coefficients_are_the_inverse_norms_of_the_modulated_filters():
    torch.manual_seed(0)
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    styles = torch.randn(3, 4, dtype=torch.float64)
    modulated = weight.unsqueeze(0) * styles.reshape(3, 1, 4, 1, 1)               # [N, O, I, kh, kw]
    expected = (modulated.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
    torch.testing.assert_close(demodulation_coefficients(weight, styles), expected, rtol=1e-12, atol=0)


def _layer_inputs(layer, batch=3):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1 if p.ndim == 0 else 0))        # noise_strength, bias: nonzero
    res = layer.resolution // layer.up if isinstance(layer, SynthesisLayer) else 8
    return torch.randn(batch, layer.in_channels, res, res), torch.randn(batch, layer.w_dim)


@pytest.mark.parametrize('activation, up, conv_clamp, gain', [('lrelu', 1, None, 1), ('lrelu', 2, 0.5, 1),
                                                             ('linear', 1, None, 0.5), ('relu', 1, 0.7, 2)])
@pytest.mark.parametrize('noise_mode', ['const', 'random', 'none'])
def test_synthesis_layer_cpu_inference_path_matches_the_recorded_one(monkeypatch, activation, up, conv_clamp, gain, noise_mode):
    """Without a graph to record, the unfused CPU forward folds demodulation, noise, bias and
    gain into one addcmul: the same values as the path autograd records (rounding only), and
    taken only where nothing records a graph."""
    layer = SynthesisLayer(6, 5, w_dim=4, resolution=16, up=up, activation=activation, conv_clamp=conv_clamp)
    x, w = _layer_inputs(layer)
    taken = []
    original = SynthesisLayer._forward_cpu_inference
    monkeypatch.setattr(SynthesisLayer, '_forward_cpu_inference', lambda *a: taken.append(1) or original(*a))
    torch.manual_seed(2)
    recorded = layer(x, w, noise_mode=noise_mode, fused_modconv=False, gain=gain)       # parameters require grad
    assert recorded.requires_grad and not taken
    torch.manual_seed(2)                                                                 # the same random noise
    with torch.no_grad():
        fast = layer(x, w, noise_mode=noise_mode, fused_modconv=False, gain=gain)
    assert taken == [1]
    torch.testing.assert_close(fast, recorded.detach(), rtol=1e-5, atol=1e-5)
    assert fast.abs().max() > 0.1
    if conv_clamp is not None:
        assert fast.abs().max() <= conv_clamp * gain and recorded.abs().max() > conv_clamp * gain * 0.99
    layer.requires_grad_(False)                                   # no parameter and no input requiring grad
    torch.manual_seed(2)
    torch.testing.assert_close(layer(x, w, noise_mode=noise_mode, fused_modconv=False, gain=gain), fast, rtol=0, atol=0)
    assert taken == [1, 1]


def _values_and_gradients(layer, inputs, **kwargs):
    torch.manual_seed(2)                                                 # the same random noise
    out = layer(*inputs, **kwargs)
    grads = torch.autograd.grad(out, list(inputs) + list(layer.parameters()), torch.cos(out))
    return out.detach(), grads


def _r1_like_gradients(layer, x, **kwargs):
    """Gradients for the parameters of |d sum(out cos(out)) / dx|^2 (a second derivative, as R1's)."""
    out = layer(x, **kwargs)
    dx, = torch.autograd.grad((out * torch.cos(out)).sum(), x, create_graph=True)
    return torch.autograd.grad(dx.square().sum(), list(layer.parameters()))


@pytest.mark.parametrize('kind, activation, conv_clamp, gain, noise_mode, fused', [
    ('synthesis', 'lrelu', None, 1, 'random', False), ('synthesis', 'lrelu', 0.5, 2, 'const', True),
    ('synthesis', 'lrelu', None, 1, 'random', True),
    ('synthesis', 'relu', None, 0.5, 'const', False), ('synthesis', 'linear', None, 3, 'const', False),
    ('synthesis', 'tanh', None, 2, 'random', False),
    ('conv3', 'lrelu', None, 1, None, None), ('conv3', 'lrelu', 0.4, 0.5, None, None), ('conv3', 'linear', None, 2, None, None),
    ('conv1', 'linear', None, 0.5 ** 0.5, None, None), ('conv1', 'lrelu', None, 1, None, None)])
def test_cpu_layers_fold_the_gain_into_the_convolution(monkeypatch, kind, activation, conv_clamp, gain, noise_mode, fused):
    """On the CPU a layer whose activation commutes with its (positive) gain scales the
    convolution (weight or demodulation), bias and noise by it and calls bias_act with gain 1:
    values and gradients (float64) equal to those with the gain passed to bias_act, and for
    D's layers (3x3, and 1x1 skips with their downsampling) the second derivatives of R1."""
    from training import networks_stylegan2
    from training.networks_stylegan2 import Conv2dLayer
    torch.manual_seed(0)
    if kind == 'synthesis':
        layer = SynthesisLayer(6, 5, w_dim=4, resolution=16, up=2, activation=activation, conv_clamp=conv_clamp)
        x, w = _layer_inputs(layer)
        layer.double().resample_filter = layer.resample_filter.float()      # FIR filters stay float32
        inputs, kwargs = (x.double().requires_grad_(), w.double().requires_grad_()), dict(noise_mode=noise_mode, fused_modconv=fused, gain=gain)
    else:
        layer = Conv2dLayer(6, 5, kernel_size=int(kind[-1]), activation=activation, down=2, conv_clamp=conv_clamp)
        layer.double().resample_filter = layer.resample_filter.float()
        with torch.no_grad():
            layer.bias.normal_()
        inputs, kwargs = (torch.randn(3, 6, 16, 16, dtype=torch.float64, requires_grad=True),), dict(gain=gain)
    expect_fold = activation in ('lrelu', 'relu') or (activation == 'linear' and layer.act_gain * gain != 1)
    folds = []
    original = networks_stylegan2.folds_gain
    monkeypatch.setattr(networks_stylegan2, 'folds_gain', lambda *a: folds.append(original(*a)) or folds[-1])
    out, grads = _values_and_gradients(layer, inputs, **kwargs)
    assert folds == [expect_fold]
    monkeypatch.setattr(networks_stylegan2, 'folds_gain', lambda *a: False)
    ref_out, ref_grads = _values_and_gradients(layer, inputs, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert out.abs().max() > 0.1 and (conv_clamp is None or ref_out.abs().max() == conv_clamp * gain)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    if kind != 'synthesis':
        ref_second = _r1_like_gradients(layer, *inputs, **kwargs)
        monkeypatch.setattr(networks_stylegan2, 'folds_gain', original)
        second = _r1_like_gradients(layer, *inputs, **kwargs)
        assert max(g.abs().max() for g in second) > 0.1
        for got, ref in zip(second, ref_second):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_torgb_cpu_inference_path_matches_the_recorded_one():
    layer = ToRGBLayer(6, 3, w_dim=4, conv_clamp=0.8)
    x, w = _layer_inputs(layer)
    recorded = layer(x, w, fused_modconv=False)
    with torch.no_grad():
        fast = layer(x, w, fused_modconv=False)
        fused = layer(x, w, fused_modconv=True)
    assert recorded.requires_grad
    torch.testing.assert_close(fast, recorded.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, recorded.detach(), rtol=1e-5, atol=1e-5)
    assert fast.abs().max() == 0.8 and (fast.abs() < 0.8).any()


@pytest.mark.parametrize('conv_clamp', [None, 0.8])
@pytest.mark.parametrize('channels_last', [True, False])
def test_torgb_adds_to_the_callers_tensor(conv_clamp, channels_last):
    """add_to + torgb(x): in place on add_to in CPU inference (accumulated by the matrix
    product on a channels-last add_to without a clamp, else added), a new tensor where a
    graph is recorded; the clamp applies to torgb's output before the sum."""
    layer = ToRGBLayer(6, 3, w_dim=4, conv_clamp=conv_clamp)
    x, w = _layer_inputs(layer)
    x = x.contiguous(memory_format=torch.channels_last)
    base = torch.randn(3, 3, 8, 8)
    make = lambda: base.contiguous(memory_format=torch.channels_last) if channels_last else base.clone()
    expected = base + layer(x, w, fused_modconv=False).detach()           # the recorded path
    assert torch.equal(layer(x, w, fused_modconv=False, add_to=make()).detach(), base + layer(x, w, fused_modconv=False).detach())
    with torch.no_grad():
        add_to = make()
        out = layer(x, w, fused_modconv=False, add_to=add_to)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out is add_to
    recorded_to = make()
    assert layer(x, w, fused_modconv=False, add_to=recorded_to).requires_grad and torch.equal(recorded_to, make())


def test_synthesis_block_cpu_inference_matches_the_recorded_one():
    from training.networks_stylegan2 import SynthesisBlock
    torch.manual_seed(0)
    block = SynthesisBlock(8, 6, w_dim=4, resolution=16, img_channels=5, is_last=False, fused_modconv_default=False)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1 if p.ndim == 0 else 0))
    x = torch.randn(3, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    img = torch.randn(3, 5, 8, 8).contiguous(memory_format=torch.channels_last)
    ws = torch.randn(3, block.num_conv + block.num_torgb, 4)
    img_before = img.clone()
    x_rec, img_rec = block(x, img, ws, noise_mode='const')
    with torch.no_grad():
        x_fast, img_fast = block(x, img, ws, noise_mode='const')
    assert img_rec.requires_grad and img_fast.shape == (3, 5, 16, 16)
    torch.testing.assert_close(x_fast, x_rec.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(img_fast, img_rec.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(img, img_before)                         # the caller's img is left alone


# --- mapping ---------------------------------------------------------------------------------

def test_mapping_truncation_and_w_avg_tracking():
    mapping = MappingNetwork(z_dim=8, c_dim=3, w_dim=6, num_ws=5, num_layers=2)
    with torch.no_grad():
        mapping.w_avg.copy_(torch.randn(6))
    z, c = torch.randn(4, 8), torch.randn(4, 3)
    ws = mapping(z, c)
    assert ws.shape == (4, 5, 6) and ws.dtype == torch.float32
    torch.testing.assert_close(mapping(z, c, truncation_psi=0), mapping.w_avg.expand(4, 5, 6), rtol=0, atol=0)
    half = mapping(z, c, truncation_psi=0.5, truncation_cutoff=2)
    torch.testing.assert_close(half[:, :2], mapping.w_avg + 0.5 * (ws[:, :2] - mapping.w_avg))
    torch.testing.assert_close(half[:, 2:], ws[:, 2:], rtol=0, atol=0)

    old = mapping.w_avg.clone()
    mapping(z, c, update_emas=True)
    torch.testing.assert_close(mapping.w_avg, ws[:, 0].mean(0) + 0.998 * (old - ws[:, 0].mean(0)))


def test_mapping_normalises_embedded_label():
    mapping = MappingNetwork(z_dim=4, c_dim=2, w_dim=4, num_ws=1, num_layers=1)
    z, c = torch.randn(3, 4), torch.randn(3, 2)
    # Scaling z or c does not change w: both are normalised to unit second moment.
    torch.testing.assert_close(mapping(z, c), mapping(7 * z, 0.1 * c), rtol=1e-5, atol=1e-5)


# --- 2-D generator ----------------------------------------------------------------------------

def test_stylegan2_generator_shapes_determinism_and_noise():
    G = Generator(16, 0, 16, img_resolution=16, img_channels=5, synthesis_kwargs=dict(channel_base=128, channel_max=16)).eval()
    assert G.num_ws == 6 and G.mapping.num_ws == 6
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith('noise_strength'):
                p.fill_(0.5)
    z = torch.randn(2, 16)
    img = G(z, None, noise_mode='const')
    assert img.shape == (2, 5, 16, 16) and img.dtype == torch.float32 and torch.isfinite(img).all()
    torch.testing.assert_close(G(z, None, noise_mode='const'), img, rtol=0, atol=0)
    assert not torch.equal(G(z, None, noise_mode='none'), img)
    assert not torch.equal(G(z, None, noise_mode='random'), G(z, None, noise_mode='random'))
    G.train()       # grouped (fused) vs shared convolution: the same function
    torch.testing.assert_close(G(z, None, noise_mode='const', fused_modconv=False), img, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='noise_mode'):
        G(z, None, noise_mode='fixed')


def test_official_state_dict_names():
    G = Generator(8, 25, 8, img_resolution=8, img_channels=3, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=64, channel_max=8))
    keys = set(G.state_dict())
    for key in ['mapping.embed.weight', 'mapping.fc0.weight', 'mapping.fc1.bias', 'mapping.w_avg', 'synthesis.b4.const',
                'synthesis.b4.conv1.noise_const', 'synthesis.b8.conv0.affine.weight', 'synthesis.b8.conv0.affine.bias',
                'synthesis.b8.conv0.noise_strength', 'synthesis.b8.conv1.weight', 'synthesis.b8.torgb.weight',
                'synthesis.b8.torgb.bias', 'synthesis.b8.torgb.affine.weight']:
        assert key in keys, key


# --- discriminator -----------------------------------------------------------------------------

def test_minibatch_std_matches_hand_computation():
    x = torch.randn(8, 6, 2, 2, dtype=torch.float64)
    out = MinibatchStdLayer(group_size=4)(x)
    assert out.shape == (8, 7, 2, 2)
    for i in range(8):      # sample i is grouped with i +- 2, i +- 4, ...
        group = x[i % 2::2]
        std = (group.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        torch.testing.assert_close(out[i, 6], std.expand(2, 2))
    with pytest.raises(ValueError, match='divisible'):
        MinibatchStdLayer(group_size=4)(torch.randn(6, 2, 2, 2))


def test_dual_discriminator_logits_and_gradients():
    D = configs.make_discriminator('tiny64', c_dim=25, disc_c_noise=1.0)
    image = torch.randn(4, 3, 64, 64, requires_grad=True)
    image_raw = torch.randn(4, 3, 32, 32, requires_grad=True)
    c = torch.randn(4, 25)
    c_before = c.clone()
    logits = D(dict(image=image, image_raw=image_raw), c)
    assert logits.shape == (4, 1) and logits.dtype == torch.float32
    torch.testing.assert_close(c, c_before, rtol=0, atol=0)     # label noise is not applied in place
    logits.sum().backward()
    assert image.grad.abs().sum() > 0 and image_raw.grad.abs().sum() > 0
    with pytest.raises(AssertionError, match='image'):
        D(dict(image=torch.randn(4, 3, 32, 32), image_raw=image_raw), c)


def test_discriminator_label_conditioning():
    D = configs.make_discriminator('tiny64', c_dim=25)
    img = dict(image=torch.randn(4, 3, 64, 64), image_raw=torch.randn(4, 3, 32, 32))
    c = torch.randn(4, 25)
    assert not torch.allclose(D(img, c), D(img, c.flip(0)))


# --- super-resolution and StyleUNet -----------------------------------------------------------------

@pytest.mark.parametrize('img_resolution,nrr,factor', [(512, 64, 8), (256, 64, 4), (128, 64, 2), (64, 32, 2)])
def test_sr_factor(img_resolution, nrr, factor):
    assert sr_factor(img_resolution, nrr) == factor


def test_superresolution_shapes_and_last_w():
    S = SuperResolution(8, 64, factor=8, w_dim=16, block_channels=(8, 4), num_fp16_res=0).eval()
    ws = torch.randn(2, 5, 16)
    rgb, x = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 8, 8)
    out = S(rgb, x, ws)
    assert out.shape == (2, 3, 64, 64) and S.input_resolution == 16
    ws2 = ws.clone()
    ws2[:, :-1] = torch.randn(2, 4, 16)     # only the last w matters
    torch.testing.assert_close(S(rgb, x, ws2), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match='no super-resolution'):
        sr_factor(512, 100)


def test_style_unet_structure_and_ws_slices():
    unet = StyleUNet(4, 6, in_resolution=16, bottleneck_resolution=4, out_resolution=32, w_dim=8, channel_base=128, channel_max=16).eval()
    assert unet.fused_resolutions == [4, 8] and unet.block_resolutions == [8, 16, 32] and unet.num_ws == 8
    assert not hasattr(unet, 'b4') and len(unet.fusion) == 2 and len(unet.encoder) == 2
    image, ws = torch.randn(2, 4, 16, 16), torch.randn(2, 8, 8)
    out = unet(image, ws, noise_mode='const')
    assert out.shape == (2, 6, 32, 32)
    ws2 = ws.clone()
    ws2[:, 0] = 0           # the 4x4 block's w: not read (no such block)
    torch.testing.assert_close(unet(image, ws2, noise_mode='const'), out, rtol=0, atol=0)
    ws2[:, 1] = 0           # b8's conv0
    assert not torch.allclose(unet(image, ws2, noise_mode='const'), out)
    assert not torch.allclose(unet(torch.randn_like(image), ws, noise_mode='const'), out)


# --- published sizes ------------------------------------------------------------------------------

def test_ffhq512_parameter_counts():
    """Spec section 4: the used parameters of the official networks, built on the meta device."""
    G = configs.make_generator('ffhq512', device='meta')
    parts = dict(backbone=G.backbone, texture=G.texture_backbone, mouth=G.mouth_backbone, blending=G.neural_blending,
                 sr=G.superresolution, decoder=G.decoder)
    expected = dict(backbone=29_008_301, texture=28_018_669, mouth=60_570_060, blending=23_757_030, sr=1_649_578, decoder=4_257)
    assert {k: count(v) for k, v in parts.items()} == expected
    assert count(G) == 143_007_895 and G.num_ws == 28
    assert count(G.mouth_backbone.encoder) == 18_944_000 and count(G.mouth_backbone.fusion) == 16_517_120
    assert count(G.neural_blending.encoder) == 6_961_280 and count(G.neural_blending.fusion) == 8_258_816
    assert count(configs.make_generator('ffhq512-eg3d', device='meta')) == 30_662_136
    assert count(configs.make_discriminator('ffhq512', c_dim=25, device='meta')) == 31_359_744
    assert count(configs.make_discriminator('ffhq512', c_dim=75, device='meta')) == 31_385_344


# --- mixed precision ---------------------------------------------------------------------------------

def test_reduced_precision_only_for_flagged_blocks_on_cuda():
    from training.networks_stylegan2 import block_dtype
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    assert block_dtype(True, 'fp16', cuda) == torch.float16
    assert block_dtype(True, 'bf16', cuda) == torch.bfloat16
    assert block_dtype(True, 'fp16', cpu) == torch.float32           # CPU always computes in float32
    assert block_dtype(False, 'fp16', cuda) == torch.float32
    assert block_dtype(True, 'fp16', cuda, force_fp32=True) == torch.float32
    with pytest.raises(ValueError, match='mixed_precision'):
        SuperResolution(8, 64, factor=2, mixed_precision='fp8')


def test_modulated_conv2d_prenormalisation_in_bf16():
    """The overflow guard of reduced precision rescales weight and styles; demodulation undoes it."""
    torch.manual_seed(2)
    x = torch.randn(2, 8, 6, 6)
    weight, styles = torch.randn(4, 8, 3, 3) * 30, torch.randn(2, 8) * 50
    ref = modulated_conv2d(x, weight, styles, padding=1)
    out = modulated_conv2d(x.to(torch.bfloat16), weight, styles, padding=1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize('mixed_precision', ['fp16', 'bf16'])
def test_tiny_networks_in_reduced_precision_on_cuda(mixed_precision):
    device = torch.device('cuda')
    torch.manual_seed(0)
    G = configs.make_generator('tiny64-eg3d', synthesis_kwargs=dict(num_fp16_res=2, conv_clamp=256, mixed_precision=mixed_precision),
                               sr_kwargs=dict(num_fp16_res=4, mixed_precision=mixed_precision),
                               rendering_kwargs=dict(deterministic_sampling=True)).eval().to(device)
    D = configs.make_discriminator('tiny64', num_fp16_res=4, conv_clamp=256, mixed_precision=mixed_precision).to(device)
    z = torch.randn(2, 64, device=device)
    from training import coords
    c = coords.make_label(coords.cam2world_look_at(torch.full([2], math.pi / 2), torch.full([2], math.pi / 2))).to(device)
    out = G(z, c, noise_mode='const')
    ref = G(z, c, noise_mode='const', force_fp32=True)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out.values())
    assert (out['image'] - ref['image']).abs().mean() < 0.05
    logits = D(out, c)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
