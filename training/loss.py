"""The training objective (SPEC section 6): EG3D's StyleGAN2 loss for a mesh-driven generator.

Phases (called by the training loop with `gain` = the phase's interval for lazy terms):
    Gmain  non-saturating logistic loss of G on its own samples
    Greg   density regularization of the radiance field (every `density_reg_every` steps)
    Dmain  logistic loss of D on fakes and reals
    Dreg   R1 on reals: gamma/2 x (|dD/d image|^2 + |dD/d image_raw|^2) (every 16 steps)
    Gboth / Dboth  main and regularization together (when the interval is 1)

Blur, as EG3D: run_D blurs `image` of reals and fakes; the reals' raw target is blurred
too (`blur_raw_target`), the fakes' `image_raw` is not.

Schedules, all functions of the image counter `cur_nimg` so that a resumed run continues
them exactly: the blur on what D sees (sigma `blur_init_sigma` fading to 0 over
`blur_fade_kimg`), the generator pose-conditioning swap probability (1 fading to
`gpc_reg_prob` over `gpc_reg_fade_kimg`), and the neural rendering resolution (initial
-> final over `neural_rendering_resolution_fade_kimg`).
"""

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import compiled
from torch_utils import training_stats
from torch_utils.ops import conv2d_double_backward
from training.dual_discriminator import filtered_resizing as resize_antialiased   # D's own filter, so reals and fakes match

PHASES = ('Gmain', 'Greg', 'Gboth', 'Dmain', 'Dreg', 'Dboth')
REG_TYPES = ('l1', 'monotonic-detach', 'monotonic-fixed')
COMPILE_CHOICES = ('none', 'D', 'G', 'all')   # which networks compile_networks() may compile (train.py --compile)
DENSITY_REG_POINTS = 1000          # uniform points per sample for the L1 density term
MONOTONIC_POINTS = 2000            # points per sample for the monotonic terms
MONOTONIC_WEIGHT = 10.0            # EG3D's weight of the monotonic term


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) blurred with EG3D's separable kernel exp2(-(x / sigma)^2), |x| <= floor(3 sigma), zero padding."""
    radius = int(np.floor(sigma * 3))
    if radius <= 0:
        return img
    x = torch.arange(-radius, radius + 1, device=img.device, dtype=img.dtype)
    f = (x / sigma).square().neg().exp2()
    f = f / f.sum()
    c = img.shape[1]
    img = conv2d_double_backward.conv2d(img, f.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
    return conv2d_double_backward.conv2d(img, f.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)


def blur_sigma_at(cur_nimg: int, blur_init_sigma: float, blur_fade_kimg: float) -> float:
    """Blur sigma on D's inputs at image counter `cur_nimg` (linear fade to 0)."""
    if blur_fade_kimg <= 0:
        return 0.0
    return max(1 - cur_nimg / (blur_fade_kimg * 1e3), 0) * blur_init_sigma


def swapping_prob_at(cur_nimg: int, gpc_reg_prob: float, gpc_reg_fade_kimg: float):
    """Probability that G is conditioned on another sample's label (None = never swap)."""
    if gpc_reg_prob is None:
        return None
    alpha = min(cur_nimg / (gpc_reg_fade_kimg * 1e3), 1) if gpc_reg_fade_kimg > 0 else 1
    return (1 - alpha) * 1 + alpha * gpc_reg_prob


def neural_rendering_resolution_at(cur_nimg: int, initial: int, final: int = None, fade_kimg: float = 0) -> int:
    """Neural rendering resolution at `cur_nimg`: initial -> final, linear in images, rounded."""
    if final is None:
        return initial
    alpha = min(cur_nimg / (fade_kimg * 1e3), 1) if fade_kimg > 0 else 1
    return int(np.rint(initial * (1 - alpha) + final * alpha))


def _geometry_kwargs(geometry) -> dict:
    """G's keyword for precomputed mesh geometry, only when there is some (Next3D's generator
    uses it, EG3D's accepts and ignores it, the Gaussian one has no such keyword)."""
    return {} if geometry is None else dict(geometry=geometry)


def r1_penalty(logits: torch.Tensor, inputs) -> torch.Tensor:
    """(B,) sum over `inputs` of |d sum(logits) / d input|^2 per sample (create_graph for the backward)."""
    with conv2d_double_backward.no_weight_gradients():     # only the inputs' gradients are wanted here
        grads = torch.autograd.grad(outputs=[logits.sum()], inputs=inputs, create_graph=True, only_inputs=True)
    return sum(g.square().sum(dim=[1, 2, 3]) for g in grads)


class Next3DLoss:
    """EG3D's StyleGAN2 loss with dual discrimination, for G(z, c, v) generators.

    Works for Next3D (meshes drive the texture) and EG3D (v ignored) generators alike.
    """

    def __init__(self,
        device: torch.device,                           # where the batch lives
        G: torch.nn.Module,                             # generator (training copy)
        D: torch.nn.Module,                             # dual discriminator
        augment_pipe: torch.nn.Module = None,           # differentiable augmentation of D's inputs, or None
        r1_gamma: float = 10.0,                         # R1 weight gamma
        style_mixing_prob: float = 0.0,                 # probability of mixing two ws at a random cut
        blur_init_sigma: float = 0.0,                   # blur sigma on D's inputs at kimg 0 (pixels)
        blur_fade_kimg: float = 0.0,                    # kimg over which the blur fades to 0
        blur_raw_target: bool = True,                   # also blur the reals' raw images (EG3D's hard-wired behaviour)
        gpc_reg_prob: float = None,                     # final swap probability of G's conditioning label; None = no swap
        gpc_reg_fade_kimg: float = 1000.0,              # kimg over which the swap probability fades from 1
        neural_rendering_resolution_initial: int = 64,  # raw render size at kimg 0
        neural_rendering_resolution_final: int = None,  # raw render size after the fade (None = fixed)
        neural_rendering_resolution_fade_kimg: float = 1000.0,  # kimg of that fade
        density_reg: float = 0.25,                      # weight of the density regularization (0 = off)
        density_reg_p_dist: float = 0.004,              # std of the perturbation of the density points (world units)
        reg_type: str = 'l1',                           # 'l1', 'monotonic-detach' or 'monotonic-fixed'
    ):
        if reg_type not in REG_TYPES:
            raise ValueError(f'reg_type must be one of {REG_TYPES}, got {reg_type!r}')
        self.device = device
        self.G, self.D, self.augment_pipe = G, D, augment_pipe
        # What the phases call; compile_networks() may route them through torch.compile.
        # R1's double backward always runs the eager D.
        self.synthesis_forward, self.sample_mixed_forward, self.D_forward = G.synthesis, G.sample_mixed, D
        self.r1_gamma = r1_gamma
        self.style_mixing_prob = style_mixing_prob
        self.blur_init_sigma, self.blur_fade_kimg, self.blur_raw_target = blur_init_sigma, blur_fade_kimg, blur_raw_target
        self.gpc_reg_prob, self.gpc_reg_fade_kimg = gpc_reg_prob, gpc_reg_fade_kimg
        self.nrr_initial, self.nrr_final = neural_rendering_resolution_initial, neural_rendering_resolution_final
        self.nrr_fade_kimg = neural_rendering_resolution_fade_kimg
        self.density_reg, self.density_reg_p_dist, self.reg_type = density_reg, density_reg_p_dist, reg_type

    # --- the two networks -----------------------------------------------------------------
    def gen_label(self, c: torch.Tensor) -> torch.Tensor:
        """The part of the dataset label G takes: the camera (25), plus expressions if G is conditioned on them."""
        return c[:, :max(int(self.G.c_dim), 25)]

    def mapping(self, z, c, swapping_prob, update_emas=False):
        """ws for z, with G's conditioning label swapped with probability `swapping_prob` and style mixing."""
        if swapping_prob is not None:
            c_swapped = torch.roll(c.clone(), 1, 0)
            swap = torch.rand((c.shape[0], 1), device=c.device) < swapping_prob
            c_cond = torch.where(swap, c_swapped, c)
        else:
            c_cond = torch.zeros_like(c)
        ws = self.G.mapping(z, c_cond, update_emas=update_emas)
        if self.style_mixing_prob > 0:
            cutoff = torch.empty([], dtype=torch.int64, device=ws.device).random_(1, ws.shape[1])
            cutoff = torch.where(torch.rand([], device=ws.device) < self.style_mixing_prob, cutoff, torch.full_like(cutoff, ws.shape[1]))
            mixed = self.G.mapping(torch.randn_like(z), c_cond, update_emas=False)
            keep = torch.arange(ws.shape[1], device=ws.device)[None, :, None] < cutoff
            ws = torch.where(keep, ws, mixed)
        return ws

    def run_G(self, z, c, v, swapping_prob, neural_rendering_resolution, update_emas=False, geometry=None):
        """-> (dict(image, image_raw, image_depth), ws). geometry: G.rasterizer.geometry of v's
        vertices made beforehand (Next3D), or None."""
        c = self.gen_label(c)
        ws = self.mapping(z, c, swapping_prob, update_emas=update_emas)
        out = self.synthesis_forward(ws, c, v, neural_rendering_resolution=neural_rendering_resolution, update_emas=update_emas,
                                     **_geometry_kwargs(geometry))
        return out, ws

    def run_D(self, img: dict, c: torch.Tensor, blur_sigma: float = 0, update_emas: bool = False, double_backward: bool = False) -> torch.Tensor:
        """D's logits (B, 1) for dict(image, image_raw); blur and augmentation applied first.

        double_backward: the logits' gradient will itself be differentiated (R1): the eager D,
        its convolutions from torch_utils/ops/conv2d_double_backward.py.
        """
        if double_backward:     # R1's second derivative through weight-gradient kernels (blur and augmentation included)
            with conv2d_double_backward.twice_differentiable():
                return self.D(self._prepare_D_input(img, blur_sigma), c, update_emas=update_emas)
        return self.D_forward(self._prepare_D_input(img, blur_sigma), c, update_emas=update_emas)

    def _prepare_D_input(self, img: dict, blur_sigma: float) -> dict:
        """dict(image, image_raw): blurred and augmented as D reads them."""
        img = dict(image=img['image'], image_raw=img['image_raw'])
        if blur_sigma > 0:
            img['image'] = gaussian_blur(img['image'], blur_sigma)
        if self.augment_pipe is not None:
            # One augmentation for both images: stack them at the image's size, augment, split.
            size, raw_size = img['image'].shape[-1], img['image_raw'].shape[-1]
            pair = torch.cat([img['image'], resize_antialiased(img['image_raw'], size)], dim=1)
            pair = self.augment_pipe(pair)
            n = img['image'].shape[1]
            img['image'] = pair[:, :n]
            img['image_raw'] = resize_antialiased(pair[:, n:], raw_size)
        return img

    def compile_networks(self, which: str, backend: str = None, log=print):
        """Run D and/or G (its synthesis and its density query) through torch.compile in the phases
        (which: one of COMPILE_CHOICES).

        Each is checked against eager at first use and falls back to eager (torch_utils/compiled.py).
        """
        if which not in COMPILE_CHOICES:
            raise ValueError(f'--compile={which!r}: expected one of {", ".join(COMPILE_CHOICES)}')
        if which in ('D', 'all'):
            self.D_forward = compiled.Compiled(self.D, self.D, 'D', backend, log)
        if which in ('G', 'all'):
            self.synthesis_forward = compiled.Compiled(self.G.synthesis, self.G, 'G.synthesis', backend, log)
            self.sample_mixed_forward = compiled.Compiled(self.G.sample_mixed, self.G, 'G.sample_mixed', backend, log)

    def _own_graph_gradients(self):
        """After a backward: the gradients of a network that runs through the cudagraphs backend
        may be memory of a CUDA graph that its next run overwrites (D's are summed over the fakes'
        and the reals' passes, G's over G main and density regularization in Gboth, every
        network's over the rounds of a batch): copy them out."""
        for forward in (self.synthesis_forward, self.D_forward):      # (G's two share a backend and parameters)
            if getattr(forward, 'backend', None) == 'cudagraphs':     # (the phase's network: the other one's have no new gradient)
                compiled.own_gradients([p for p in forward.params if p.requires_grad])

    # --- the phases -----------------------------------------------------------------------
    def schedule(self, cur_nimg: int) -> dict:
        """The schedules' values at `cur_nimg`."""
        return dict(
            blur_sigma=blur_sigma_at(cur_nimg, self.blur_init_sigma, self.blur_fade_kimg),
            swapping_prob=swapping_prob_at(cur_nimg, self.gpc_reg_prob, self.gpc_reg_fade_kimg),
            neural_rendering_resolution=neural_rendering_resolution_at(cur_nimg, self.nrr_initial, self.nrr_final, self.nrr_fade_kimg),
        )

    def accumulate_gradients(self, phase: str, real_img, real_c, real_v, gen_z, gen_c, gen_v, gain: float, cur_nimg: int,
                             gen_geometry=None):
        """Backpropagate one phase's loss x gain for one batch.

        real_img (B, 3, R, R) float in [-1, 1]; real_c, gen_c (B, label_dim); real_v, gen_v
        (B, V + 68, 3) mesh metres; gen_z (B, z_dim); gen_geometry: Next3D's
        G.rasterizer.geometry of gen_v's vertices made beforehand (training_loop.GeometryCollate),
        or None to rasterize here.
        """
        if phase not in PHASES:
            raise ValueError(f'unknown phase {phase!r}')
        if self.density_reg == 0:
            phase = {'Greg': 'none', 'Gboth': 'Gmain'}.get(phase, phase)
        if self.r1_gamma == 0:
            phase = {'Dreg': 'none', 'Dboth': 'Dmain'}.get(phase, phase)
        if phase == 'none':
            return
        s = self.schedule(cur_nimg)
        nrr = s['neural_rendering_resolution']
        training_stats.report0('Progress/blur_sigma', s['blur_sigma'])
        training_stats.report0('Progress/neural_rendering_resolution', nrr)
        if s['swapping_prob'] is not None:
            training_stats.report0('Progress/swapping_prob', s['swapping_prob'])

        if phase in ('Gmain', 'Gboth'):
            gen_img, _ws = self.run_G(gen_z, gen_c, gen_v, s['swapping_prob'], nrr, geometry=gen_geometry)
            gen_logits = self.run_D(gen_img, gen_c, blur_sigma=s['blur_sigma'])
            training_stats.report('Loss/scores/fake', gen_logits)
            training_stats.report('Loss/signs/fake', gen_logits.sign())
            loss_G = F.softplus(-gen_logits)
            training_stats.report('Loss/G/loss', loss_G)
            loss_G.mean().mul(gain).backward()
            self._own_graph_gradients()

        if phase in ('Greg', 'Gboth'):
            loss_reg = self.density_regularization(gen_z, gen_c, gen_v, s['swapping_prob'], geometry=gen_geometry)
            loss_reg.mul(gain).backward()
            self._own_graph_gradients()

        if phase in ('Dmain', 'Dboth'):
            gen_img, _ws = self.run_G(gen_z, gen_c, gen_v, s['swapping_prob'], nrr, update_emas=True, geometry=gen_geometry)
            gen_logits = self.run_D(gen_img, gen_c, blur_sigma=s['blur_sigma'], update_emas=True)
            training_stats.report('Loss/scores/fake', gen_logits)
            training_stats.report('Loss/signs/fake', gen_logits.sign())
            loss_Dgen = F.softplus(gen_logits)
            loss_Dgen.mean().mul(gain).backward()
            self._own_graph_gradients()

        if phase in ('Dmain', 'Dreg', 'Dboth'):
            do_r1 = phase in ('Dreg', 'Dboth')
            real_raw = resize_antialiased(real_img, nrr)
            if self.blur_raw_target:    # EG3D blurs the real raw target (not the fakes' raw images) by the same sigma
                real_raw = gaussian_blur(real_raw, s['blur_sigma'])
            image = real_img.detach().requires_grad_(do_r1)
            image_raw = real_raw.detach().requires_grad_(do_r1)
            real_logits = self.run_D(dict(image=image, image_raw=image_raw), real_c, blur_sigma=s['blur_sigma'], double_backward=do_r1)
            training_stats.report('Loss/scores/real', real_logits)
            training_stats.report('Loss/signs/real', real_logits.sign())
            loss = torch.zeros_like(real_logits)
            if phase in ('Dmain', 'Dboth'):
                loss_Dreal = F.softplus(-real_logits)
                training_stats.report('Loss/D/loss', loss_Dgen + loss_Dreal)
                loss = loss + loss_Dreal
            if do_r1:
                penalty = r1_penalty(real_logits, [image, image_raw])
                loss_r1 = penalty * (self.r1_gamma / 2)
                training_stats.report('Loss/r1_penalty', penalty)
                training_stats.report('Loss/D/reg', loss_r1)
                loss = loss + loss_r1[:, None]
            loss.mean().mul(gain).backward()
            self._own_graph_gradients()

    def density_regularization(self, gen_z, gen_c, gen_v, swapping_prob, geometry=None) -> torch.Tensor:
        """EG3D's density regularization of the radiance field (a scalar, weight included).

        'l1': L1 between sigma at uniform points in [-1, 1]^3 and at the same points moved by
        N(0, density_reg_p_dist). The monotonic types add 10 x mean relu(sigma(p) -
        sigma(p - dz)), dz = box_warp / 256 along -z, i.e. density must not drop as rays go
        deeper; 'monotonic-detach' stops the gradient through the front sample. (The L1 term
        always uses density_reg_p_dist; EG3D's monotonic variants use box_warp / 256 there.)
        Both terms read one query of G, i.e. one set of planes (EG3D queried G twice, making
        the planes twice, with independent synthesis noise).
        """
        ws = self.mapping(gen_z, self.gen_label(gen_c), swapping_prob)
        b = ws.shape[0]
        # All points in one query, so that the generator's planes are made once.
        pts = torch.rand((b, DENSITY_REG_POINTS, 3), device=ws.device) * 2 - 1
        moved = pts + torch.randn_like(pts) * self.density_reg_p_dist
        groups = [pts, moved]
        monotonic_types = ('monotonic-detach', 'monotonic-fixed')
        if self.reg_type in monotonic_types:
            box_warp = float(self.G.rendering_kwargs.get('box_warp', 1.0))
            front = torch.rand((b, MONOTONIC_POINTS, 3), device=ws.device) * 2 - 1
            behind = front + torch.tensor([0.0, 0.0, -1.0], device=ws.device) * (box_warp / 256)
            groups = [front, behind] + groups
        both = torch.cat(groups, dim=1)
        sigma = self.sample_mixed_forward(both, torch.randn_like(both), ws, gen_v, **_geometry_kwargs(geometry))['sigma']
        loss = torch.zeros([], device=ws.device)
        if self.reg_type in monotonic_types:
            sigma_front, sigma_behind, sigma = sigma.split([MONOTONIC_POINTS, MONOTONIC_POINTS, 2 * DENSITY_REG_POINTS], dim=1)
            if self.reg_type == 'monotonic-detach':
                sigma_front = sigma_front.detach()
            monotonic = torch.relu(sigma_front - sigma_behind).mean() * MONOTONIC_WEIGHT
            training_stats.report('Loss/G/monotonic', monotonic)
            loss = loss + monotonic
        tv = F.l1_loss(sigma[:, :DENSITY_REG_POINTS], sigma[:, DENSITY_REG_POINTS:]) * self.density_reg
        training_stats.report('Loss/G/density_reg', tv)
        return loss + tv
