"""Official-format pickles are read without executing their embedded source."""

import io
import pickle

import pytest
import torch

from tests.official_pickles import PersistentStandIn, dumps_official
from training.official_pickle import ModuleRecord, OfficialPickleError, load_official_pickle


def _build(classes):
    decoder = classes['training.triplane.OSGDecoder']()
    decoder.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Softplus(), torch.nn.Linear(64, 33))
    mapping = PersistentStandIn('training.networks_stylegan2.MappingNetwork', init_kwargs=dict(z_dim=512, c_dim=25),
                                params={'weight': torch.arange(6.0).reshape(2, 3)}, buffers={'w_avg': torch.ones(4)})
    G = PersistentStandIn('training.triplane.TriPlaneGenerator', init_kwargs=dict(z_dim=512, rendering_kwargs={'box_warp': 1}),
                          modules={'mapping': mapping, 'decoder': decoder}, z_dim=512)
    return dict(G=G, G_ema=G, D=None, training_set_kwargs=dict(resolution=512), augment_pipe=None)


def test_official_structure_is_read_and_source_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / 'pwned.txt'
    monkeypatch.setenv('NEXT3D_PWNED', str(marker))
    data = load_official_pickle(io.BytesIO(dumps_official(_build)), 'net.pkl')
    assert not marker.exists()
    G = data['G']
    assert isinstance(G, ModuleRecord) and G.class_name == 'training.triplane.TriPlaneGenerator'
    assert G.init_kwargs == dict(z_dim=512, rendering_kwargs={'box_warp': 1})
    tensors = G.named_tensors()
    assert torch.equal(tensors['mapping.weight'], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(tensors['mapping.w_avg'], torch.ones(4))
    assert tensors['decoder.net.0.weight'].shape == (64, 32) and tensors['decoder.net.2.bias'].shape == (33,)
    assert G.children()['decoder'].class_name == 'training.triplane.OSGDecoder'
    assert data['G_ema'] is G and data['training_set_kwargs'] == {'resolution': 512}


def test_other_globals_refused(tmp_path, monkeypatch):
    marker = tmp_path / 'pwned.txt'

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), 'w'))

    with pytest.raises(OfficialPickleError, match="evil.pkl.*io.open.*not allowed"):
        load_official_pickle(io.BytesIO(pickle.dumps({'G': Evil()})), 'evil.pkl')
    assert not marker.exists()


def test_truncated_official_pickle():
    blob = dumps_official(_build)
    with pytest.raises(OfficialPickleError, match='net.pkl'):
        load_official_pickle(io.BytesIO(blob[: len(blob) // 2]), 'net.pkl')
