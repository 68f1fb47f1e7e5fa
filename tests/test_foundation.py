"""dnnlib, torch_utils.misc, training_stats and the safe checkpoint format."""

import os
import pickle

import numpy as np
import pytest
import torch

import dnnlib
import legacy
from torch_utils import misc, persistence, training_stats


# ---------------------------------------------------------------------------------------
# A small persistent network for checkpoint tests. It lives in this test module, so the
# tests that construct it widen the allowed packages for the duration of the test.

@persistence.persistent_class
class TinyNet(torch.nn.Module):
    def __init__(self, in_dim: int, out_dim: int, cfg: dict = None, scale: float = 1.0):
        super().__init__()
        self.fc = torch.nn.Linear(in_dim, out_dim)
        self.register_buffer('offset', torch.arange(out_dim, dtype=torch.float32))
        self.scale = scale
        self.cfg = cfg

    def forward(self, x):
        return self.fc(x) * self.scale + self.offset


@pytest.fixture
def allow_test_classes(monkeypatch):
    monkeypatch.setattr(persistence, 'ALLOWED_PACKAGES', persistence.ALLOWED_PACKAGES + (__name__ + '.',))


# ---------------------------------------------------------------------------------------
# dnnlib

def test_easydict_attribute_access():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d['b'] == 2 and d.a == 1
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        _ = d.missing


def test_open_url_local_and_file_url(tmp_path):
    path = tmp_path / 'x.bin'
    path.write_bytes(b'hello')
    with dnnlib.open_url(str(path)) as f:
        assert f.read() == b'hello'
    with dnnlib.open_url(path.as_uri()) as f:
        assert f.read() == b'hello'
    with pytest.raises(FileNotFoundError, match='missing.bin'):
        dnnlib.open_url(str(tmp_path / 'missing.bin'))


def test_logger_tees_to_file(tmp_path, capsys):
    log = tmp_path / 'log.txt'
    with dnnlib.Logger(str(log)):
        print('to both')
    print('after')
    assert log.read_text() == 'to both\n'
    assert 'to both' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# misc

def test_assert_shape():
    x = torch.zeros(2, 3, 4)
    misc.assert_shape(x, [2, None, 4])
    with pytest.raises(AssertionError, match='dimension 2'):
        misc.assert_shape(x, [2, 3, 5])
    with pytest.raises(AssertionError, match='number of dimensions'):
        misc.assert_shape(x, [2, 3])


@pytest.mark.parametrize('shuffle', [False, True])
def test_infinite_sampler_ranks_disjoint_and_covering(shuffle):
    n, world = 37, 3
    dataset = list(range(n))
    per_rank = []
    for rank in range(world):
        it = iter(misc.InfiniteSampler(dataset, rank=rank, num_replicas=world, shuffle=shuffle, seed=5, window_size=0))
        per_rank.append([next(it) for _ in range(len(range(rank, n, world)))])
    flat = sum(per_rank, [])
    assert sorted(flat) == dataset                      # covering, no duplicates
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(per_rank[a]) & set(per_rank[b])


def test_infinite_sampler_reshuffles_each_epoch():
    it = iter(misc.InfiniteSampler(list(range(50)), shuffle=True, seed=1, window_size=0.5))
    first, second = [next(it) for _ in range(50)], [next(it) for _ in range(50)]
    assert sorted(first) != first or sorted(second) != second
    assert first != second
    with pytest.raises(ValueError, match='empty'):
        misc.InfiniteSampler([], shuffle=False)


def test_copy_params_and_buffers_report():
    src, dst = TinyNet(3, 4), TinyNet(3, 5)
    torch.nn.init.constant_(src.fc.weight, 7.0)
    report = misc.copy_params_and_buffers(src, dst)
    assert report['copied'] == []
    assert sorted(report['shape_mismatch']) == ['fc.bias', 'fc.weight', 'offset']
    dst2 = TinyNet(3, 4)
    report = misc.copy_params_and_buffers(src, dst2)
    assert sorted(report['copied']) == ['fc.bias', 'fc.weight', 'offset']
    assert torch.equal(dst2.fc.weight, src.fc.weight)
    extra = torch.nn.Sequential(torch.nn.Linear(3, 4))
    report = misc.copy_params_and_buffers(src, extra)
    assert sorted(report['missing']) == ['0.bias', '0.weight']
    report = misc.copy_params_and_buffers(src, extra, rename=lambda n: n.replace('0.', 'fc.'))
    assert sorted(report['copied']) == ['0.bias', '0.weight']
    with pytest.raises(KeyError):
        misc.copy_params_and_buffers(src, dst, require_all=True)


def test_print_module_summary_counts(capsys):
    net = TinyNet(3, 4)
    out = misc.print_module_summary(net, [torch.zeros(2, 3)])
    assert out.shape == (2, 4)
    text = capsys.readouterr().out
    total_line = [line for line in text.splitlines() if line.startswith('Total')][0]
    assert total_line.split()[1] == str(3 * 4 + 4) and total_line.split()[2] == '4'


def test_nan_to_num_grads():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([float('nan'), float('inf'), 1.0])
    misc.nan_to_num_grads([p])
    assert p.grad.tolist() == [0.0, 1e5, 1.0]


# ---------------------------------------------------------------------------------------
# training_stats

def test_training_stats_collector_intervals():
    training_stats.reset()
    collector = training_stats.Collector(regex='Loss/.*')
    training_stats.report('Loss/a', torch.tensor([1.0, 2.0, 3.0]))
    training_stats.report('Loss/a', 4.0)
    training_stats.report('Other/b', 10.0)
    training_stats.report('Loss/a', float('nan'))      # ignored
    training_stats.report('Loss/a', torch.tensor([float('inf'), float('-inf')]))   # ignored
    collector.update()
    assert collector.num('Loss/a') == 4
    assert collector.mean('Loss/a') == pytest.approx(2.5)
    assert collector.std('Loss/a') == pytest.approx(np.std([1, 2, 3, 4]))
    assert 'Other/b' not in collector.as_dict()
    training_stats.report('Loss/a', [10.0])
    collector.update()
    assert collector.num('Loss/a') == 1 and collector.mean('Loss/a') == 10.0
    collector.update()                                 # empty interval keeps the last value
    assert collector['Loss/a'] == 10.0


# ---------------------------------------------------------------------------------------
# persistence

def test_checkpoint_round_trip_identical(tmp_path, allow_test_classes):
    net = TinyNet(3, 4, cfg=dnnlib.EasyDict(kind='demo', sizes=(1, 2), nested={'a': [1.5]}), scale=2.0)
    torch.nn.init.normal_(net.fc.weight)
    path = tmp_path / 'network-snapshot-000000.pkl'
    persistence.save_checkpoint(str(path), dict(G=net, G_ema=net, training_set_kwargs=dict(path='x.zip', resolution=64)))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask          # not mkstemp's 0600
    data = legacy.load_network_pkl(str(path))
    assert isinstance(data.G, TinyNet) and data.D is None
    assert data.G.init_kwargs == dict(in_dim=3, out_dim=4, cfg=dict(kind='demo', sizes=(1, 2), nested={'a': [1.5]}), scale=2.0)
    for (n1, t1), (n2, t2) in zip(net.state_dict().items(), data.G.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    x = torch.randn(5, 3)
    assert torch.equal(net(x), data.G_ema(x))
    assert data.training_set_kwargs.resolution == 64
    with open(path, 'rb') as f:                          # file objects work too
        assert isinstance(legacy.load_network_pkl(f).G, TinyNet)


class _Payload:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path(__import__('os').environ['NEXT3D_PWNED']).write_text('ran')",))


def test_malicious_pickle_refused_and_not_run(tmp_path, monkeypatch):
    marker = tmp_path / 'pwned.txt'
    monkeypatch.setenv('NEXT3D_PWNED', str(marker))
    evil = tmp_path / 'evil.pkl'
    evil.write_bytes(pickle.dumps({'G': _Payload()}))
    # Sanity: an ordinary unpickle would run it.
    pickle.loads(evil.read_bytes())
    assert marker.read_text() == 'ran'
    marker.unlink()
    with pytest.raises(persistence.CheckpointError, match='evil.pkl.*refused'):
        legacy.load_network_pkl(str(evil))
    assert not marker.exists()
    # The same payload inside torch.save's zip container is refused as well.
    evil_zip = tmp_path / 'evil_zip.pkl'
    torch.save({'G': _Payload()}, str(evil_zip))
    with pytest.raises(persistence.CheckpointError, match='refused'):
        legacy.load_network_pkl(str(evil_zip))
    assert not marker.exists()


def test_truncated_checkpoint_clear_error(tmp_path, allow_test_classes):
    path = tmp_path / 'net.pkl'
    persistence.save_checkpoint(str(path), dict(G=TinyNet(3, 4)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(persistence.CheckpointError, match=r'net\.pkl.*(truncated|corrupt)'):
        legacy.load_network_pkl(str(path))
    with pytest.raises(FileNotFoundError, match='nope.pkl'):
        legacy.load_network_pkl(str(tmp_path / 'nope.pkl'))


def test_foreign_class_refused(tmp_path):
    # A structurally valid checkpoint that names a class outside the project's packages.
    payload = {'format': persistence.FORMAT, 'format_version': 1, 'data': {'G': {
        '__persistent_module__': True, 'class_name': 'os.system', 'init_kwargs': {}, 'state_dict': {}}}}
    path = tmp_path / 'foreign.pkl'
    torch.save(payload, str(path))
    with pytest.raises(persistence.CheckpointError, match="foreign.pkl.*refusing to construct 'os.system'"):
        legacy.load_network_pkl(str(path))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / 'plain.pt'
    torch.save({'weights': torch.zeros(3)}, str(path))
    with pytest.raises(persistence.CheckpointError, match='plain.pt.*not a checkpoint'):
        persistence.load_checkpoint(str(path))


def test_unsaveable_kwargs_rejected_at_construction():
    with pytest.raises(TypeError, match='cannot be stored'):
        TinyNet(3, 4, cfg={'f': object()})


def test_atomic_write_keeps_old_file_on_crash(tmp_path, monkeypatch, allow_test_classes):
    path = tmp_path / 'snap.pkl'
    persistence.save_checkpoint(str(path), dict(G=TinyNet(3, 4, scale=1.0)))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt('killed mid-write')

    with monkeypatch.context() as m:
        m.setattr(os, 'replace', crash)
        with pytest.raises(KeyboardInterrupt):
            persistence.save_checkpoint(str(path), dict(G=TinyNet(3, 4, scale=3.0)))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ['snap.pkl']     # no temp file left behind
    assert persistence.load_checkpoint(str(path))['G'].scale == 1.0


def test_keep_gradient_layout_hands_the_gradient_back_in_the_input_layout():
    from torch_utils import misc
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    for keep in (False, True):
        y = misc.keep_gradient_layout(x) if keep else x
        parts = torch.cat([y[:1], y[1:]])          # cat's backward slices a contiguous gradient
        grad, = torch.autograd.grad((parts * weight).sum(), x)
        torch.testing.assert_close(grad, weight, atol=0, rtol=0)
        assert grad.is_contiguous(memory_format=torch.channels_last) == keep
    detached = x.detach()
    assert misc.keep_gradient_layout(detached) is detached
    contiguous = torch.randn(3, 2, requires_grad=True)
    assert misc.keep_gradient_layout(contiguous) is contiguous


def test_split_keeping_gradient_layout_writes_the_items_gradients_in_the_input_layout():
    from torch_utils import misc
    # Planes-like strides: (B, 3, C, H, W) viewed from a channels-last (B, 3 C, H, W) tensor.
    x = torch.randn(3, 2, 4, 5, 6, dtype=torch.float64).permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
    x.requires_grad_()
    weights = [torch.randn(1, 2, 4, 5, 6, dtype=torch.float64) for _ in range(3)]
    items = misc.split_keeping_gradient_layout(x)
    assert len(items) == 3 and all(torch.equal(a, b) for a, b in zip(items, x.split(1)))
    # Item 1 takes no part: its gradient is zero (an uninitialised buffer would show).
    grad, = torch.autograd.grad((items[0] * weights[0]).sum() + (items[2] * weights[2]).sum(), x)
    torch.testing.assert_close(grad, torch.cat([weights[0], torch.zeros_like(weights[1]), weights[2]]), atol=0, rtol=0)
    assert grad.stride() == x.stride()
    # The split's own backward (what it replaces): the same values, contiguous.
    ref, = torch.autograd.grad((x.split(1)[0] * weights[0]).sum() + (x.split(1)[2] * weights[2]).sum(), x)
    torch.testing.assert_close(grad, ref, atol=0, rtol=0)
    assert ref.is_contiguous() and not grad.is_contiguous()
    with torch.no_grad():
        assert all(t.grad_fn is None for t in misc.split_keeping_gradient_layout(x))
    # Differentiable twice (its backward is a copy into slices).
    small = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: torch.cat([u.square() for u in misc.split_keeping_gradient_layout(t)[::2]]), (small,))


def test_device_constant_is_made_once_outside_inference_mode_and_remade_after_a_write(monkeypatch):
    from torch_utils import misc
    from training import coords
    monkeypatch.setattr(misc, '_device_constants', {})
    made = []
    make = lambda d: made.append(d) or torch.arange(3.0, device=d)
    with torch.inference_mode():                          # a first use inside inference_mode ...
        first = misc.device_constant('test.arange', 'cpu', make)
    assert not first.is_inference()                       # ... still gives a tensor autograd can save
    assert misc.device_constant('test.arange', torch.device('cpu'), make) is first and len(made) == 1
    first.add_(1)                                         # written into: made again
    again = misc.device_constant('test.arange', 'cpu', make)
    assert again is not first and again.tolist() == [0.0, 1.0, 2.0] and len(made) == 2
    # project_onto_planes' axes index, made first under inference_mode, serves a backward.
    with torch.inference_mode():
        coords.project_onto_planes(torch.randn(1, 5, 3))
    points = torch.randn(1, 5, 3, requires_grad=True)
    coords.project_onto_planes(points).sum().backward()
    assert points.grad.shape == points.shape


def test_version_key_follows_writes_and_skips_inference_tensors():
    from torch_utils import misc
    t = torch.zeros(3)
    key = misc.version_key(t)
    assert misc.version_key(t) == key
    t.add_(1)
    assert misc.version_key(t) != key and misc.version_key(t.clone()) != misc.version_key(t)
    with torch.inference_mode():
        assert misc.version_key(torch.zeros(3)) is None


@pytest.mark.parametrize('cpuinfo, processor, mkl, want', [
    ('processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t: avx512f\n', '', True, True),
    ('processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t: avx2\n', '', True, False),
    ('processor\t: 0\nvendor_id\t: GenuineIntel\n', '', False, False),          # a torch without MKL
    (None, '', True, False),                                                   # no /proc/cpuinfo, no vendor named
    (None, 'Intel64 Family 6 Model 106 Stepping 6, GenuineIntel', True, True),    # Windows names it there
    (None, 'AMD64 Family 25 Model 1 Stepping 1, AuthenticAMD', True, False),
])
def test_mkl_vector_math_fast_reads_the_cpu_vendor(monkeypatch, cpuinfo, processor, mkl, want):
    import builtins
    import io
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path != '/proc/cpuinfo':
            return real_open(path, *args, **kwargs)
        if cpuinfo is None:
            raise FileNotFoundError(path)
        return io.StringIO(cpuinfo)
    monkeypatch.setattr(builtins, 'open', fake_open)
    monkeypatch.setattr(misc.platform, 'processor', lambda: processor)
    monkeypatch.setattr(misc.torch.backends.mkl, 'is_available', lambda: mkl)
    assert misc.mkl_vector_math_fast.__wrapped__() is want
