"""legacy.load_network_pkl on official EG3D/Next3D pickles (built here with the official structure).

The fixtures take our tiny presets with random weights and write them out the way the
official code pickles its networks: nested persistent records with the official class
names, constructor arguments and tensor names (the renames below are written
independently of training/official_import.py), the parameters the official Next3D
generator holds but never runs, and classes pickled by reference. Loading must put every
tensor back in place (equal state dicts, equal images) without executing anything.
"""

import io
import lzma
import math
import os

import numpy as np

import pytest
import torch

import legacy
from tests.official_pickles import PersistentStandIn, dumps_official
from torch_utils.ops import upfirdn2d
from training import configs
from training import coords
from training.mesh.head_model import load_head_model
from training.official_import import OfficialImportError

BUFFER_NAMES = ('noise_const', 'resample_filter', 'w_avg')
SYNTHESIS_KWARGS = dict(channel_base=512, channel_max=32, fused_modconv_default='inference_only', num_fp16_res=0, conv_clamp=None)
MAPPING_KWARGS = dict(num_layers=2)
OFFICIAL_RENDERING_KEYS = ('image_resolution', 'disparity_space_sampling', 'clamp_mode', 'c_gen_conditioning_zero',
                           'gpc_reg_prob', 'c_scale', 'superresolution_noise_mode', 'density_reg', 'density_reg_p_dist',
                           'reg_type', 'decoder_lr_mul', 'sr_antialias', 'depth_resolution', 'depth_resolution_importance',
                           'ray_start', 'ray_end', 'box_warp', 'avg_camera_radius', 'avg_camera_pivot')

# Our name prefix -> official name prefix (Next3D's StyleUNets have a `synthesis.` level).
NEXT3D_RENAMES = [
    ('mouth_backbone.', 'mouth_backbone.synthesis.'),
    ('neural_blending.', 'neural_blending.synthesis.'),
]
# Official class of the record at each (official) prefix; other records get a generic layer class.
EG3D_CLASSES = {
    '': 'training.triplane.TriPlaneGenerator',
    'backbone': 'training.networks_stylegan2.Generator',
    'backbone.mapping': 'training.networks_stylegan2.MappingNetwork',
    'backbone.synthesis': 'training.networks_stylegan2.SynthesisNetwork',
    'superresolution': 'training.superresolution.SuperresolutionHybrid2X',
}
NEXT3D_CLASSES = {
    '': 'training_avatar_texture.triplane_next3d.TriPlaneGenerator',
    'backbone': 'training_avatar_texture.networks_stylegan2.Generator',
    'texture_backbone': 'training_avatar_texture.networks_stylegan2.Generator',
    'mouth_backbone': 'training_avatar_texture.networks_stylegan2_styleunet.Generator',
    'neural_blending': 'training_avatar_texture.networks_stylegan2_styleunet.Generator',
    'superresolution': 'training_avatar_texture.superresolution.SuperresolutionHybrid2X',
}


@pytest.fixture(scope='module')
def head():
    return load_head_model()


def randomise(module: torch.nn.Module, seed: int):
    """Perturb every parameter (zeros too: noise strengths, biases) and the w_avg buffers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith('w_avg'):
                b.copy_(torch.randn(b.shape, generator=g))
    return module.eval().requires_grad_(False)


def official_tree(flat: dict, classes: dict, init: dict, by_reference: dict, prefix: str = ''):
    """Dotted {name: tensor} -> nested records as the official persistence pickles them."""
    params, buffers, children = {}, {}, {}
    for name, t in flat.items():
        head, _, rest = name.partition('.')
        if rest:
            children.setdefault(head, {})[rest] = t
        else:
            (buffers if head in BUFFER_NAMES or prefix == '' else params)[head] = t
    path = prefix.rstrip('.')
    modules = {h: official_tree(sub, classes, init, by_reference, prefix + h + '.') for h, sub in children.items()}
    if path in by_reference:
        return by_reference[path](params, buffers, modules)
    args, kwargs, attrs = init.get(path, ((), {}, {}))
    return PersistentStandIn(classes.get(path, 'training.networks_stylegan2.Layer'), init_args=args, init_kwargs=kwargs,
                             params=params, buffers=buffers, modules=modules, **attrs)


def osg_decoder(cls_name):
    """The decoder is pickled by reference, its `net` a torch Sequential of persistent layers."""
    def build(classes):
        def make(params, buffers, modules):
            layers = modules['net'].meta['state']['_modules']
            net = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Softplus(), torch.nn.Identity())
            net._modules['0'], net._modules['2'] = layers['0'], layers['2']     # persistent stand-ins
            decoder = classes[cls_name]()
            decoder.net = net
            return decoder
        return make
    return build


def official_rendering_kwargs(G, sr_module: str, **extra) -> dict:
    out = {k: G.rendering_kwargs[k] for k in OFFICIAL_RENDERING_KEYS}
    return dict(out, superresolution_module=sr_module, **extra)


def generator_record_kwargs(G, sr_module: str, **extra) -> dict:
    return dict(z_dim=G.z_dim, c_dim=G.c_dim, w_dim=G.w_dim, img_resolution=G.img_resolution, img_channels=3,
                sr_num_fp16_res=0, mapping_kwargs=MAPPING_KWARGS,
                rendering_kwargs=official_rendering_kwargs(G, sr_module, **extra),
                sr_kwargs=dict(channel_base=512, channel_max=32, fused_modconv_default='inference_only'),
                **SYNTHESIS_KWARGS)


def by_reference_parts(classes, prefix: str, decoder_cls: str):
    """renderer / ray_sampler / decoder as the official code pickles them (by reference)."""
    renderer = classes[f'{prefix}.volumetric_rendering.renderer.ImportanceRenderer']()
    renderer.plane_axes = torch.eye(3).repeat(3, 1, 1)          # a plain tensor attribute, as in EG3D
    sampler = classes[f'{prefix}.volumetric_rendering.ray_sampler.RaySampler']()
    return renderer, sampler, osg_decoder(decoder_cls)(classes)


# --- EG3D ---------------------------------------------------------------------------------

def eg3d_source():
    torch.manual_seed(0)
    return randomise(configs.make_generator('tiny64-eg3d', plane_axes='eg3d'), 1)


def eg3d_pickle(G, drop=()) -> bytes:
    flat = {k: v for k, v in G.state_dict().items() if k != '_extra_state' and k not in drop}
    record_kwargs = generator_record_kwargs(G, 'training.superresolution.SuperresolutionHybrid2X')
    init = {
        '': ((), record_kwargs, dict(neural_rendering_resolution=G.neural_rendering_resolution, rendering_kwargs=record_kwargs['rendering_kwargs'])),
        'backbone': ((), dict(z_dim=G.z_dim, c_dim=G.c_dim, w_dim=G.w_dim, img_resolution=G.plane_resolution, img_channels=96,
                              mapping_kwargs=MAPPING_KWARGS, **SYNTHESIS_KWARGS), {}),
    }

    def build(classes):
        renderer, sampler, decoder = by_reference_parts(classes, 'training', 'training.triplane.OSGDecoder')
        tree = official_tree(flat, EG3D_CLASSES, init, {'decoder': decoder})
        tree.meta['state']['_modules'].update(renderer=renderer, ray_sampler=sampler)
        return dict(G=tree, G_ema=tree, D=None, training_set_kwargs=dict(resolution=64, use_labels=True), augment_pipe=None)
    return dumps_official(build)


def test_eg3d_import_exact(tmp_path, monkeypatch):
    marker = tmp_path / 'pwned.txt'
    monkeypatch.setenv('NEXT3D_PWNED', str(marker))
    src = eg3d_source()
    path = tmp_path / 'eg3d-official.pkl'
    path.write_bytes(eg3d_pickle(src))
    out = legacy.load_network_pkl(str(path))
    assert not marker.exists()
    G = out.G_ema
    assert type(G).__name__ == 'EG3DGenerator' and G.plane_axes == 'eg3d' and G.renderer.plane_axes == 'eg3d'
    assert G.init_kwargs['plane_axes'] == 'eg3d'
    ref, got = src.state_dict(), G.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        if k != '_extra_state':
            assert torch.equal(ref[k], got[k]), k
    assert G.rendering_kwargs == src.rendering_kwargs
    assert G.neural_rendering_resolution == src.neural_rendering_resolution
    report = out.import_report['G']
    assert report['kind'] == 'eg3d' and not report['not_in_ours'] and not report['uninitialised']
    assert out.training_set_kwargs.resolution == 64 and out.D is None
    z, c = torch.randn(2, G.z_dim), coords.make_label(coords.cam2world_look_at(torch.tensor([1.4, 1.7]), torch.tensor([1.5, 1.6])))
    with torch.no_grad():
        torch.manual_seed(5)
        a = src(z, c, truncation_psi=0.7, noise_mode='const')
        torch.manual_seed(5)
        b = G(z, c, truncation_psi=0.7, noise_mode='const')
    for key in ('image', 'image_raw', 'image_depth'):
        assert torch.equal(a[key], b[key]), key


def test_missing_official_tensor_names_file_and_tensor(tmp_path):
    src = eg3d_source()
    path = tmp_path / 'broken-official.pkl'
    path.write_bytes(eg3d_pickle(src, drop=('backbone.synthesis.b16.conv1.weight',)))
    with pytest.raises(OfficialImportError, match=r'broken-official\.pkl.*backbone\.synthesis\.b16\.conv1\.weight'):
        legacy.load_network_pkl(str(path))


# --- Next3D -------------------------------------------------------------------------------

def next3d_source():
    torch.manual_seed(0)
    return randomise(configs.make_generator('tiny64'), 2)


def official_unused_next3d(G, g) -> dict:
    """Random tensors the official Next3D generator holds but never runs."""
    extra = {}
    w, c = G.w_dim, G.c_dim
    for part in ('texture_backbone', 'mouth_backbone', 'neural_blending'):
        extra[f'{part}.mapping.embed.weight'] = torch.randn(w, c, generator=g)
        extra[f'{part}.mapping.embed.bias'] = torch.randn(w, generator=g)
        extra[f'{part}.mapping.fc0.weight'] = torch.randn(w, 2 * w, generator=g)
        extra[f'{part}.mapping.fc0.bias'] = torch.randn(w, generator=g)
        extra[f'{part}.mapping.fc1.weight'] = torch.randn(w, w, generator=g)
        extra[f'{part}.mapping.fc1.bias'] = torch.randn(w, generator=g)
        extra[f'{part}.mapping.w_avg'] = torch.randn(w, generator=g)
    ch = lambda res: min(512 // res, 32)
    # Mouth: b4 and the fusion layer at the input resolution (16 here, 64 at FFHQ).
    extra['mouth_backbone.synthesis.b4.const'] = torch.randn(ch(4), 4, 4, generator=g)
    for name, shape in (('conv1.weight', (ch(4), ch(4), 3, 3)), ('conv1.bias', (ch(4),)), ('conv1.affine.weight', (ch(4), w)),
                        ('conv1.affine.bias', (ch(4),)), ('conv1.noise_strength', ()), ('conv1.noise_const', (4, 4)),
                        ('torgb.weight', (32, ch(4), 1, 1)), ('torgb.bias', (32,)), ('torgb.affine.weight', (ch(4), w)),
                        ('torgb.affine.bias', (ch(4),)), ('resample_filter', (4, 4))):
        extra[f'mouth_backbone.synthesis.b4.{name}'] = torch.randn(shape, generator=g)
    extra['mouth_backbone.synthesis.fusion.2.weight'] = torch.randn(ch(16), 2 * ch(16), 3, 3, generator=g)
    extra['mouth_backbone.synthesis.fusion.2.bias'] = torch.randn(ch(16), generator=g)
    # Blending: b4..b16 (below the decoder start) and the fusion layer at 64.
    for res in (4, 8, 16):
        extra[f'neural_blending.synthesis.b{res}.conv1.weight'] = torch.randn(ch(res), ch(res), 3, 3, generator=g)
        extra[f'neural_blending.synthesis.b{res}.torgb.weight'] = torch.randn(32, ch(res), 1, 1, generator=g)
    extra['neural_blending.synthesis.b4.const'] = torch.randn(ch(4), 4, 4, generator=g)
    extra['neural_blending.synthesis.fusion.2.weight'] = torch.randn(ch(64), 2 * ch(64), 3, 3, generator=g)
    extra['neural_blending.synthesis.fusion.2.bias'] = torch.randn(ch(64), generator=g)
    return extra


def next3d_pickle(G, with_mask_attribute: bool = False, drop=()) -> (bytes, set):
    g = torch.Generator().manual_seed(3)
    flat = {}
    for k, v in G.state_dict().items():
        if k == '_extra_state' or k.startswith('rasterizer.'):
            continue
        for ours, official in NEXT3D_RENAMES:
            if k.startswith(ours):
                k = official + k[len(ours):]
                break
        flat[k] = v
    unused = official_unused_next3d(G, g)
    flat.update(unused)
    r = G.rasterizer
    uv = r.uvcoords.clone()
    deca = torch.cat([uv * 2 - 1, torch.ones(len(uv), 1)], dim=1)
    deca[:, 1] = -deca[:, 1]
    topology = dict(faces=r.faces[None].clone(), uvfaces=r.uvfaces[None].clone(), raw_uvcoords=uv[None], uvcoords=deca[None],
                    face_uvcoords=deca[r.uvfaces][None], dense_faces=torch.randint(0, 100, (1, 50, 3), generator=g),
                    dataset_label_std=torch.rand(25, generator=g))
    flat.update(topology)
    for name in drop:
        del flat[name]
    record_kwargs = generator_record_kwargs(G, 'training_avatar_texture.superresolution.SuperresolutionHybrid2X', gen_exp_cond=True)
    record_kwargs['topology_path'] = 'data/FFHQ/head_template.obj'
    attrs = dict(neural_rendering_resolution=G.neural_rendering_resolution, load_lms=True, uv_resolution=64,
                 orth_scale=torch.tensor([[5.0]]), orth_shift=torch.tensor([[0, -0.01, -0.01]]))
    if with_mask_attribute:
        attrs['uv_face_mask'] = r.uv_mask.clone()
    init = {
        '': ((), record_kwargs, attrs),
        'backbone': ((G.z_dim, G.c_dim, G.w_dim), dict(img_resolution=64, img_channels=96, mapping_ws=2 * 10,
                                                        mapping_kwargs=MAPPING_KWARGS, **SYNTHESIS_KWARGS), {}),
        'texture_backbone': ((G.z_dim, G.c_dim, G.w_dim), dict(img_resolution=64, img_channels=32,
                                                                mapping_kwargs=MAPPING_KWARGS, **SYNTHESIS_KWARGS), {}),
        'mouth_backbone': ((G.z_dim, G.c_dim, G.w_dim), dict(img_resolution=64, img_channels=32, in_size=16, final_size=4,
                                                              cond_channels=32, num_cond_res=16, mapping_kwargs=MAPPING_KWARGS,
                                                              **SYNTHESIS_KWARGS), {}),
        'neural_blending': ((G.z_dim, G.c_dim, G.w_dim), dict(cond_channels=32, img_resolution=64, img_channels=32, in_size=64,
                                                               final_size=16, num_cond_res=64, mapping_kwargs=MAPPING_KWARGS,
                                                               **SYNTHESIS_KWARGS), {}),
    }
    assert G.num_ws == 2 * 10            # tiny64: 10 backbone + 10 texture ws

    def build(classes):
        renderer, sampler, decoder = by_reference_parts(classes, 'training_avatar_texture',
                                                        'training_avatar_texture.triplane_next3d.OSGDecoder')
        tree = official_tree(flat, NEXT3D_CLASSES, init, {'decoder': decoder})
        tree.meta['state']['_modules'].update(renderer=renderer, ray_sampler=sampler)
        return dict(G=tree, G_ema=tree, D=None, training_set_kwargs=dict(resolution=64), augment_pipe=None)
    return dumps_official(build), set(unused) | {'uvcoords', 'face_uvcoords', 'dense_faces', 'dataset_label_std'}


def test_next3d_import_exact(tmp_path, monkeypatch, head):
    marker = tmp_path / 'pwned.txt'
    monkeypatch.setenv('NEXT3D_PWNED', str(marker))
    src = next3d_source()
    blob, unused = next3d_pickle(src)
    path = tmp_path / 'next3d-official.pkl'
    path.write_bytes(blob)
    out = legacy.load_network_pkl(str(path), uv_mask_path=configs.BUNDLED_UV_MASK)
    assert not marker.exists()
    G = out.G_ema
    assert type(G).__name__ == 'Next3DGenerator' and G.topology_loaded
    assert (G.plane_axes, G.plane_layout, G.side_alpha) == ('next3d', 'released', 'released')
    assert G.rasterizer.layout == 'released' and G.rasterizer.side_alpha == 'released'
    assert G.num_vertices == src.num_vertices
    report = out.import_report['G']
    assert set(report['skipped']) == unused
    assert not report['not_in_ours'] and not report['uninitialised'] and not report['shape_mismatch']
    assert any('gen_exp_cond' in n for n in report['notes'])
    assert G.rendering_kwargs == src.rendering_kwargs
    # Every tensor in place: compare against the source with the released options.
    ref = src.state_dict()
    got = G.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        if k != '_extra_state':
            assert torch.equal(ref[k], got[k]), k
    compat = configs.make_generator('tiny64', plane_layout='released', side_alpha='released')
    compat.load_state_dict(ref)
    compat.eval()
    z = torch.randn(1, G.z_dim)
    c = coords.make_label(coords.cam2world_look_at(torch.tensor([math.pi / 2 + 0.3]), torch.tensor([math.pi / 2])))
    with torch.no_grad():
        verts, lms = head(jaw_pose=torch.tensor([[0.2, 0.0, 0.0]]))
        v = torch.cat([verts, lms], dim=1)
        torch.manual_seed(7)
        a = compat(z, c, v, noise_mode='const')
        torch.manual_seed(7)
        b = G(z, c, v, noise_mode='const')
    for key in ('image', 'image_raw', 'image_depth'):
        assert torch.equal(a[key], b[key]), key


def test_next3d_uv_mask_from_attribute_or_missing(tmp_path):
    src = next3d_source()
    blob, _ = next3d_pickle(src, with_mask_attribute=True)
    out = legacy.load_network_pkl(io.BytesIO(blob))
    assert out.G.topology_loaded and torch.equal(out.G.rasterizer.uv_mask, src.rasterizer.uv_mask)
    blob, _ = next3d_pickle(src)
    with pytest.warns(UserWarning, match='uv_mask_path'):
        out = legacy.load_network_pkl(io.BytesIO(blob))
    G = out.G
    assert not G.topology_loaded and torch.equal(G.rasterizer.faces, src.rasterizer.faces)
    assert any('UV mask' in n for n in out.import_report['G']['notes'])
    with pytest.raises(RuntimeError, match='uv_mask_path'):
        G(torch.randn(1, G.z_dim), torch.zeros(1, 25), torch.zeros(1, G.num_vertices + 68, 3))


def test_next3d_uvs_derived_from_deca_uvcoords():
    """Without raw_uvcoords, UVs come from the DECA-style uvcoords (2u - 1, 1 - 2v, 1): v flips back up."""
    src = next3d_source()
    blob, _ = next3d_pickle(src, with_mask_attribute=True, drop=('raw_uvcoords',))
    out = legacy.load_network_pkl(io.BytesIO(blob))
    uv, ref = out.G.rasterizer.uvcoords, src.rasterizer.uvcoords
    assert torch.allclose(uv, ref, atol=1e-6) and not torch.allclose(uv[:, 1], 1 - ref[:, 1], atol=1e-3)
    assert any('derived' in n for n in out.import_report['G']['notes'])


def test_force_fp16(tmp_path):
    src = eg3d_source()
    out = legacy.load_network_pkl(io.BytesIO(eg3d_pickle(src)), force_fp16=True)
    assert out.G.init_kwargs['synthesis_kwargs']['num_fp16_res'] == 4
    assert out.G.init_kwargs['synthesis_kwargs']['conv_clamp'] == 256
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), out.G.state_dict().values())
               if isinstance(a, torch.Tensor))
    from torch_utils import persistence
    path = tmp_path / 'snap.pkl'
    persistence.save_checkpoint(str(path), dict(G=src, D=configs.make_discriminator('tiny64')))
    own = legacy.load_network_pkl(str(path), force_fp16=True)
    assert own.G.init_kwargs['synthesis_kwargs']['num_fp16_res'] == 4 and own.D.init_kwargs['num_fp16_res'] == 4
    assert torch.equal(own.G.state_dict()['backbone.synthesis.b64.conv1.weight'], src.state_dict()['backbone.synthesis.b64.conv1.weight'])


# --- discriminator ------------------------------------------------------------------------

def test_discriminator_import_exact(tmp_path):
    torch.manual_seed(0)
    src = randomise(configs.make_discriminator('tiny64'), 4)
    flat = dict(src.state_dict())
    flat['resample_filter'] = upfirdn2d.setup_filter([1, 3, 3, 1])     # the official D's own filter buffer
    init = {'': ((), dict(c_dim=25, img_resolution=64, img_channels=3, architecture='resnet', channel_base=512, channel_max=32,
                          num_fp16_res=0, conv_clamp=None, cmap_dim=None, disc_c_noise=0.0,
                          block_kwargs=dict(freeze_layers=0), mapping_kwargs=dict(num_layers=2),
                          epilogue_kwargs=dict(mbstd_group_size=4)), {})}
    classes = {'': 'training_avatar_texture.dual_discriminator.DualDiscriminator'}

    def build(_classes):
        return dict(D=official_tree(flat, classes, init, {}), training_set_kwargs=None)
    out = legacy.load_network_pkl(io.BytesIO(dumps_official(build)))
    D = out.D
    assert out.G is None and type(D).__name__ == 'DualDiscriminator'
    assert not out.import_report['D']['skipped'] and set(out.import_report['D']['fixed']) == {'resample_filter'}
    ref, got = src.state_dict(), D.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    img = dict(image=torch.randn(4, 3, 64, 64), image_raw=torch.randn(4, 3, 32, 32))
    c = torch.randn(4, 25)
    with torch.no_grad():
        assert torch.equal(src(img, c), D(img, c))


def test_own_snapshots_still_load(tmp_path):
    from torch_utils import persistence
    D = configs.make_discriminator('tiny64')
    path = tmp_path / 'snap.pkl'
    persistence.save_checkpoint(str(path), dict(D=D, training_set_kwargs=dict(resolution=64)))
    out = legacy.load_network_pkl(str(path))
    assert 'import_report' not in out and out.training_set_kwargs.resolution == 64
    assert all(torch.equal(a, b) for a, b in zip(D.state_dict().values(), out.D.state_dict().values()))


# --- the official fixtures (tests/fixtures/make_official_fixtures.py: pickled by the official code)

OFFICIAL_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'official')


def official_records(name):
    """The records of an official fixture pickle, as the importer sees them."""
    from training.official_pickle import load_official_pickle
    with lzma.open(os.path.join(OFFICIAL_FIXTURES, f'{name}.pkl.xz')) as f:
        return load_official_pickle(io.BytesIO(f.read()), f'{name}.pkl')


def official_inputs(name):
    inputs = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(OFFICIAL_FIXTURES, 'inputs.npz')).items()}
    ref = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(OFFICIAL_FIXTURES, f'{name}.npz')).items()}
    return inputs, ref


@pytest.mark.parametrize('name', ['eg3d', 'next3d'])
def test_official_fixed_filters_reported_as_fixed(name):
    """The official D keeps a [1, 3, 3, 1] filter buffer at the top and in every block, the
    super-resolution one more; none is read by the official forward (resnet D, antialiased
    resize). They are fixed, equal to the filter ours use: reported so, never as unmapped."""
    from training.official_import import import_network
    records = official_records(name)
    expected = {'D': {'resample_filter', 'b64.resample_filter', 'b32.resample_filter', 'b16.resample_filter', 'b8.resample_filter'},
                'G_ema': {'superresolution.resample_filter'}}
    for key, names in expected.items():
        _, report = import_network(records[key], f'{name}.pkl [{key}]')
        assert set(report['fixed']) == names
        assert report['not_in_ours'] == []
        assert all('equal to ours' in why for why in report['fixed'].values())


def test_official_fixed_filter_that_differs_is_reported():
    from training.official_import import format_report, import_network
    record = official_records('eg3d')['D']
    block = record.children()['b32']
    block.state['_buffers']['resample_filter'] = block.state['_buffers']['resample_filter'] * 2
    _, report = import_network(record, 'eg3d.pkl [D]')
    assert 'b32.resample_filter' not in report['fixed']
    assert any('b32.resample_filter' in note and 'differs' in note for note in report['notes'])
    assert 'b32.resample_filter' in format_report({'D': report})


@pytest.mark.parametrize('name', ['eg3d', 'next3d'])
def test_official_missing_c_scale_means_zero(name):
    """The official mapping multiplies c by rendering_kwargs.get('c_scale', 0): a pickle without
    c_scale maps with the camera zeroed. Reference: the official mapping with the key removed."""
    from training.official_import import import_network
    record = official_records(name)['G_ema']
    for rk in (record.state['rendering_kwargs'], record.state['_init_kwargs']['rendering_kwargs']):
        del rk['c_scale']
    G, report = import_network(record, f'{name}.pkl [G_ema]')
    inputs, ref = official_inputs(name)
    assert G.rendering_kwargs['c_scale'] == 0
    assert any('c_scale' in note for note in report['notes'])
    with torch.no_grad():
        ws = G.mapping(inputs['z'], inputs['c'], truncation_psi=0.7)
    assert (ws - ref['ws_no_c_scale']).abs().max() < 1e-6
    assert (ws - ref['ws']).abs().max() > 1e-2


@pytest.mark.parametrize('stored', [32, np.int64(32), torch.tensor(32)])
def test_official_stored_neural_rendering_resolution_is_used(stored):
    """EG3D's second stage renders at 128 with an 8x super-resolution of a 512 image (the
    "-128" pickles): the stored resolution, not img_resolution // 8, is what the official G
    renders at. The fixture: SR x4 from 32 to 64 with the raw at 32, not 64 // 4 = 16."""
    from training.official_import import import_network
    record = official_records('eg3d')['G_ema']
    record.state['neural_rendering_resolution'] = stored
    G, report = import_network(record, 'eg3d.pkl [G_ema]')
    assert G.neural_rendering_resolution == 32 and G.img_resolution // 4 == 16
    assert any('neural_rendering_resolution 32' in note for note in report['notes'])


@pytest.mark.parametrize('stored', [0, 'auto', 33.5, None])
def test_official_unusable_neural_rendering_resolution(stored):
    from training.official_import import import_network
    record = official_records('eg3d')['G_ema']
    record.state['neural_rendering_resolution'] = stored
    G, report = import_network(record, 'eg3d.pkl [G_ema]')
    assert G.neural_rendering_resolution == G.img_resolution // 4
    if stored is not None:
        assert any('neural_rendering_resolution' in note and 'not used' in note for note in report['notes'])
