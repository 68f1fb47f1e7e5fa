"""benchmarks/vs_original.py: the parts that do not need the original code."""

import time

import numpy as np
import pytest

from benchmarks import vs_original


def test_flood_fill_stands_in_for_opencv():
    # What the original's fill_mouth asks of cv2.floodFill: from pixel (0, 0), fill the
    # 4-connected region whose values lie within [seed - lo, seed + up] (FLOODFILL_FIXED_RANGE).
    image = np.zeros([7, 8], np.float32)
    image[1:6, 2:7] = 255.0          # a ring ...
    image[2:5, 3:6] = 0.0            # ... around a hole (the open mouth)
    image[3, 4] = 100.0
    image[6, 0] = 254.0              # inside the range: filled
    mask = np.zeros([9, 10], np.uint8)
    count, image_out, mask_out, _ = vs_original.flood_fill(image, mask, (0, 0), (255, 255, 255), (0, 0, 0), (254, 254, 254),
                                                           vs_original.FLOODFILL_FIXED_RANGE)
    outside = np.ones([7, 8], bool)
    outside[1:6, 2:7] = False
    assert image_out is image and mask_out is mask
    assert count == outside.sum()
    assert (image[outside] == 255).all()
    assert (image[2:5, 3:6] == np.array([[0, 0, 0], [0, 100, 0], [0, 0, 0]])).all()   # the hole is untouched
    assert (mask[1:-1, 1:-1] == outside).all() and mask[0].sum() == 0


def test_official_patches_replace_distinct_literals():
    sizes = dict(plane=128, texture=128, channels=32, mouth_in=32, mouth_bottleneck=4, blend_bottleneck=16,
                 sr_channels=[32, 16], w_dim=128, num_vertices=4977, img=128, raw=64)
    for preset in ('next3d', 'eg3d'):
        patches = vs_original.official_patches(preset, sizes)
        assert patches
        for rel, edits in patches.items():
            for old, new, count in edits:
                assert old != new and count >= 1, (rel, old)
    next3d = dict(vs_original.official_patches('next3d', sizes))['training_avatar_texture/triplane_next3d.py']
    assert ('v[:, :5023], v[:, 5023:]', 'v[:, :4977], v[:, 4977:]', 3) in next3d


def test_main_refuses_a_compile_backend_where_it_would_not_apply(tmp_path):
    from click.testing import CliRunner
    for backend in ('cudagraphs', 'inductor'):      # the default too, named without --compile
        result = CliRunner().invoke(vs_original.main, ['--eg3d-src', str(tmp_path), '--outdir', str(tmp_path / 'out'), '--compile-backend', backend])
        assert result.exit_code == 1 and 'Error: --compile-backend applies to --compile=D, G or all only' in result.output, result.output
    result = CliRunner().invoke(vs_original.main, ['--eg3d-src', str(tmp_path), '--outdir', str(tmp_path / 'out'), '--geometry-in-loader'])
    assert result.exit_code == 1 and 'Error: --geometry-in-loader applies to the Next3D rows (--original-src) only' in result.output
    from torch_utils import compiled
    assert vs_original.COMPILE_BACKENDS == compiled.BACKENDS and vs_original.COMPILE_BACKENDS[0] == compiled.DEFAULT_BACKEND
    assert not (tmp_path / 'out').exists()


def test_main_needs_a_checkout(tmp_path):
    from click.testing import CliRunner
    result = CliRunner().invoke(vs_original.main, [])
    assert result.exit_code == 1 and 'Error: give --original-src (Next3D) and/or --eg3d-src (EG3D)' in result.output
    result = CliRunner().invoke(vs_original.main, ['--eg3d-src', str(tmp_path)])
    assert result.exit_code == 1
    assert f'Error: {tmp_path}: no eg3d/training/triplane.py; is this a checkout of NVlabs/eg3d?' in result.output


def test_summarise_amortises_phases_and_reports_the_compile_log():
    # Each pair: per-phase (wall, CPU) seconds. The step charges Greg / 4 and Dreg / 16.
    def phases(scale):
        return {'Gmain': (1.0 * scale, 0.9 * scale), 'Greg': (4.0 * scale, 4.0 * scale),
                'Dmain': (0.5 * scale, 0.5 * scale), 'Dreg': (16.0 * scale, 16.0 * scale)}
    samples = dict(ours=dict(train=[phases(1), phases(3), phases(1)], infer=[(1.0, 1.0), (2.0, 2.0), (1.0, 1.0)]),
                   original=dict(train=[phases(2)] * 3, infer=[(4.0, 4.0)] * 3))
    profiles = {side: dict(total_ms=10.0, top=[('aten::mul', 5.0, 2)]) for side in ('ours', 'original')}
    compile_log = ['torch.compile: D compiled for a new input signature in 3.0 s (matches eager)',
                   'RuntimeWarning: torch.compile: G.synthesis failed to compile; running it eagerly from now on.']
    info = dict(ours=dict(params=[10, 20], peak_rss_gib=1.0, compile_log=compile_log),
                original=dict(params=[10, 20], peak_rss_gib=2.0))
    rows, detail = vs_original.summarise('next3d', samples, profiles, info)
    wall = dict((m, (a, b, r)) for _, m, a, b, r, _ in rows)
    assert wall['training step (wall)'] == (3.5, 7.0, 0.5)      # 1 + 4/4 + 0.5 + 16/16; ratio median of 0.5, 1.5, 0.5
    assert rows[0][5] == (0.5, 1.5) and rows[2][5] == (0.25, 0.5)     # the pairs' lowest and highest ratio
    assert abs(wall['training step (CPU)'][0] - 3.4) < 1e-12
    assert wall['inference (wall)'] == (1.0, 4.0, 0.25)
    text = '\n'.join(detail)
    assert '| Gmain | 0.900 | 1.800 | 0.50 |' in text
    # Every pair in the order run (CPU seconds): the second pair is ours' slow one.
    assert '| 1 | 3.400 | 6.800 | 2.00x | 1.000 | 4.000 | 4.00x |' in text
    assert '| 2 | 10.200 | 6.800 | 0.67x | 2.000 | 4.000 | 2.00x |' in text
    assert '| 3 | 3.400 | 6.800 | 2.00x | 1.000 | 4.000 | 4.00x |' in text
    assert 'torch.compile on our side (2 lines' in text
    assert all(f'- {line}' in detail for line in compile_log)
    info['ours'].pop('compile_log')
    assert 'torch.compile' not in '\n'.join(vs_original.summarise('next3d', samples, profiles, info)[1])


def test_convolution_seconds_times_only_convolutions():
    import time
    import torch

    class Side:       # Gmain: a convolution forward and backward; Greg: no convolution, only slow other work
        def __init__(self):
            self.weight = torch.randn(8, 4, 3, 3, requires_grad=True)

        def phase(self, name, interval):
            x = torch.randn(2, 4, 32, 32, requires_grad=True)
            if name == 'Gmain':
                torch.nn.functional.conv2d(x, self.weight, padding=1).square().sum().backward()
            elif name == 'Greg':
                end = time.process_time() + 0.05
                while time.process_time() < end:
                    x = x.mul(1.0)

        def infer(self):
            with torch.no_grad():
                torch.nn.functional.conv_transpose2d(torch.randn(1, 8, 16, 16), self.weight, stride=2)

    seconds = vs_original.convolution_seconds(Side())
    assert set(seconds) == {'Gmain', 'Greg', 'Dmain', 'Dreg', 'infer'}
    assert seconds['Gmain'] > 0 and seconds['infer'] > 0
    assert seconds['Greg'] == 0 and seconds['Dmain'] == 0 and seconds['Dreg'] == 0


def test_summarise_reports_the_convolution_ceiling():
    phases = lambda g: {'Gmain': (g, g), 'Greg': (4.0, 4.0), 'Dmain': (1.0, 1.0), 'Dreg': (16.0, 16.0)}
    samples = dict(ours=dict(train=[phases(1.0)] * 3, infer=[(0.5, 0.5)] * 3),
                   original=dict(train=[phases(7.0)] * 3, infer=[(2.0, 2.0)] * 3))
    profiles = {side: dict(total_ms=10.0, top=[]) for side in ('ours', 'original')}
    conv = lambda g: {'Gmain': g, 'Greg': 2.0, 'Dmain': 0.5, 'Dreg': 8.0, 'infer': 0.25}
    info = dict(ours=dict(params=[1, 1], peak_rss_gib=1.0, convolutions=conv(0.5)),
                original=dict(params=[1, 1], peak_rss_gib=1.0, convolutions=conv(1.0)))
    text = '\n'.join(vs_original.summarise('next3d', samples, profiles, info)[1])
    # ours: step 1 + 1 + 1 + 1 = 4, convolutions 0.5 + 0.5 + 0.5 + 0.5 = 2; original: step 10, convolutions 2.5.
    assert '| training step | 2.000 | 2.000 | 2.500 | 7.500 | 5.00x |' in text
    assert '| inference | 0.250 | 0.250 | 0.250 | 1.750 | 8.00x |' in text
    assert 'by stage' not in text
    for side, t in (('ours', 0.1), ('original', 0.4)):
        info[side]['stages'] = {'renderer': t, 'rest': t, 'inference': 2 * t}
    text = '\n'.join(vs_original.summarise('next3d', samples, profiles, info)[1])
    assert '### next3d: one inference by stage' in text and '| renderer | 0.100 | 0.400 | 4.00x |' in text



def test_summarise_on_a_gpu_reports_wall_time_gpu_memory_and_the_plugins():
    # On a GPU the host waits for the device: wall time only, phases in wall seconds, GPU memory.
    phases = lambda s: {'Gmain': (1.0 * s, 9.0), 'Greg': (4.0 * s, 9.0), 'Dmain': (0.5 * s, 9.0), 'Dreg': (16.0 * s, 9.0)}
    samples = dict(ours=dict(train=[phases(1)] * 3, infer=[(0.5, 9.0)] * 3),
                   original=dict(train=[phases(4)] * 3, infer=[(2.0, 9.0)] * 3))
    profiles = {side: dict(total_ms=12.5, top=[('ampere_sgemm', 5.0, 2)], kernels=1234,
                           host=dict(total_ms=40.0, top=[('aten::mul', 10.0, 300)])) for side in ('ours', 'original')}
    info = dict(ours=dict(params=[1, 1], peak_rss_gib=1.0, peak_gpu_gib=0.5, plugins={}),
                original=dict(params=[1, 1], peak_rss_gib=2.0, peak_gpu_gib=0.75,
                              plugins={'bias_act': 'CUDA plugin', 'upfirdn2d': 'reference (its CUDA plugin failed: boom)'}))
    rows, detail = vs_original.summarise('eg3d', samples, profiles, info, device='cuda')
    assert [(m, a, b, r) for _, m, a, b, r, _ in rows] == [('training step (wall)', 3.5, 14.0, 0.25), ('inference (wall)', 0.5, 2.0, 0.25)]
    text = '\n'.join(detail)
    assert 'phases (wall-clock seconds' in text and '| Gmain | 1.000 | 4.000 | 0.25 |' in text
    assert 'Peak GPU memory allocated: ours 0.50 GiB, original 0.75 GiB.' in text
    assert "The original's custom ops: bias_act: CUDA plugin, upfirdn2d: reference (its CUDA plugin failed: boom)." in text
    assert '1,234 kernels, 0.013 s on the device' in text and '| `ampere_sgemm` | 5.0 | 40.0% | 2 |' in text
    assert 'top 10 host ops by self CPU time (the same step; total 0.040 s)' in text and '| `aten::mul` | 10.0 | 25.0% | 300 |' in text


def test_main_on_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    import torch
    from click.testing import CliRunner
    if torch.cuda.is_available():
        pytest.skip('a CUDA device is present')
    (tmp_path / 'eg3d' / 'training').mkdir(parents=True)
    (tmp_path / 'eg3d' / 'training' / 'triplane.py').write_text('')
    result = CliRunner().invoke(vs_original.main, ['--eg3d-src', str(tmp_path), '--device', 'cuda', '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 1
    assert result.output.strip() == 'Error: --device cuda: this PyTorch sees no CUDA device'
    assert not (tmp_path / 'out').exists()


def test_git_commit_of_a_copied_tree_comes_from_the_environment(monkeypatch):
    # A tree copied to a GPU machine may have no git metadata, or an older commit's (seen on
    # the first GPU run): NEXT3D_COMMIT, when set, names the commit in the result files.
    import subprocess
    from benchmarks import common
    monkeypatch.delenv('NEXT3D_COMMIT', raising=False)
    from_git = common.git_commit()
    monkeypatch.setenv('NEXT3D_COMMIT', 'abc1234')
    assert common.git_commit() == 'abc1234' != from_git

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0])
    monkeypatch.setattr(common.subprocess, 'run', no_git)
    assert common.git_commit() == 'abc1234'
    monkeypatch.delenv('NEXT3D_COMMIT')
    assert common.git_commit() == 'unknown'


def test_prepare_needs_the_gpu_option(tmp_path):
    from click.testing import CliRunner
    (tmp_path / 'eg3d' / 'training').mkdir(parents=True)
    (tmp_path / 'eg3d' / 'training' / 'triplane.py').write_text('')
    result = CliRunner().invoke(vs_original.main, ['--eg3d-src', str(tmp_path), '--prepare'])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --prepare builds the original's CUDA plugins: give --device cuda"


def test_the_plugin_loader_edit_uses_what_load_returns():
    # The original's custom_ops looks the built module up in sys.modules, where PyTorch 2's
    # cpp_extension.load no longer puts it: the edit must take load's return value instead.
    sizes = dict(plane=64, texture=64, channels=32, mouth_in=32, mouth_bottleneck=4, blend_bottleneck=8,
                 sr_channels=[32, 16], w_dim=64, num_vertices=4977, img=128, raw=64)
    for preset in ('next3d', 'eg3d'):
        edits = vs_original.official_patches(preset, sizes)['torch_utils/custom_ops.py']
        assert all(new.lstrip().startswith('module = torch.utils.cpp_extension.load(') for old, new, _ in edits[:2])
        assert edits[2] == ('        module = importlib.import_module(module_name)\n', '', 1)


def test_stubs_stand_in_for_modules_this_python_removed(monkeypatch):
    # The original imports distutils.util (gone from Python 3.12 without setuptools) and imp
    # (gone in 3.12): stand-ins where they are missing, the real modules where present.
    import importlib
    import importlib.util
    import sys
    real_import = importlib.import_module

    def without_removed(name, *args):
        if name in ('imp', 'distutils.util'):
            raise ImportError(f'No module named {name!r}')
        return real_import(name, *args)
    before = dict(sys.modules)
    try:
        monkeypatch.setattr(importlib, 'import_module', without_removed)
        vs_original.install_stubs(lambda *a, **k: None, lambda path: None)
        assert sys.modules['imp'].load_module is vs_original._never_called
        assert sys.modules['distutils.util'].strtobool is vs_original._never_called
        monkeypatch.setattr(importlib, 'import_module', real_import)
        for name in ('imp', 'distutils', 'distutils.util'):
            sys.modules.pop(name, None)
        has_imp = importlib.util.find_spec('imp') is not None     # Python < 3.12
        vs_original.install_stubs(lambda *a, **k: None, lambda path: None)
        assert (sys.modules['imp'].load_module is vs_original._never_called) != has_imp     # the real module where present
    finally:
        for name in set(sys.modules) - set(before):
            del sys.modules[name]
        sys.modules.update(before)


def test_a_workers_new_log_lines_come_once_and_whole(tmp_path):
    """The warm-up reports the worker's torch.compile lines as they come (a run cut short by a time limit
    still shows how far the compiles got): each complete line once, a partial one when it is complete."""
    worker = vs_original.Worker.__new__(vs_original.Worker)
    worker.log_path = str(tmp_path / 'w.log')
    worker.log = open(worker.log_path, 'w')
    worker.log_offset = 0
    try:
        worker.log.write('torch.compile: D compiled in 1.0 s\nhalf a li')
        worker.log.flush()
        assert worker.new_log_lines() == ['torch.compile: D compiled in 1.0 s']
        worker.log.write('ne, ünïcode\nnext\n')
        worker.log.flush()
        assert worker.new_log_lines() == ['half a line, ünïcode', 'next']
        assert worker.new_log_lines() == []
    finally:
        worker.log.close()


def test_a_waiting_parent_echoes_the_workers_compile_lines_as_they_come(tmp_path, monkeypatch):
    """A call that compiles for minutes: its torch.compile lines reach echo while the worker still works."""
    import subprocess
    import sys
    import time
    monkeypatch.setattr(vs_original.Worker, 'POLL_SECONDS', 0.1)
    worker = vs_original.Worker.__new__(vs_original.Worker)
    worker.side, worker.log_path, worker.log_offset, worker.compile_lines = 'ours', str(tmp_path / 'w.log'), 0, []
    echoed = []
    worker.echo = lambda line: echoed.append((line, time.time()))
    worker.log = open(worker.log_path, 'w')
    script = ('import sys, time; print("torch.compile: D compiled in 2.0 s", file=sys.stderr, flush=True); '
              'print("unrelated", file=sys.stderr, flush=True); time.sleep(1.5); print(\'{"result": 7}\', flush=True)')
    worker.proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=worker.log, text=True)
    try:
        assert worker._read() == 7
        replied = time.time()
    finally:
        worker.proc.wait()
        worker.log.close()
    assert [line for line, _ in echoed] == worker.compile_lines == ['torch.compile: D compiled in 2.0 s']
    assert replied - echoed[0][1] > 1.0                 # echoed while the worker slept, not after its reply


def test_run_preset_reports_each_warm_up_call_and_its_compile_lines(tmp_path, monkeypatch):
    phase_times = {name: (0.5, 0.5) for name, _ in vs_original.PHASES}

    class FakeWorker(vs_original.Worker):
        def __init__(self, side, cfg_path, log_path, echo=None):
            self.side, self.log_path, self.log_offset, self.echo, self.compile_lines = side, log_path, 0, echo, []
            self.log = open(log_path, 'w')
            self.compiled = set()

        def call(self, cmd):
            if self.side == 'ours' and cmd in ('train', 'infer') and cmd not in self.compiled:      # the first call compiles
                self.compiled.add(cmd)
                self.log.write(f'torch.compile: G.synthesis compiled for {cmd}\nother output\n')
                self.log.flush()
            self._collect_compile_lines()
            return dict(train=phase_times, infer=(0.1, 0.1), profile={}, info={}).get(cmd)

        def close(self):
            self.log.close()

    monkeypatch.setattr(vs_original, 'Worker', FakeWorker)
    lines = []
    samples, _, info = vs_original.run_preset('next3d', dict(compile='all', device='cuda'), str(tmp_path), 1, lines.append)
    warm_up = [line for line in lines if 'warm-up' in line or line.startswith('  ')]
    assert [line.split(' in ')[0] for line in warm_up] == [
        '  torch.compile: G.synthesis compiled for train', 'next3d: ours warm-up train',
        '  torch.compile: G.synthesis compiled for infer', 'next3d: ours warm-up infer',
        'next3d: original warm-up train', 'next3d: original warm-up infer']
    assert info['ours']['compile_log'] == ['torch.compile: G.synthesis compiled for train', 'torch.compile: G.synthesis compiled for infer']
    assert samples['ours']['train'] == [phase_times]


@pytest.mark.parametrize('fell_back', [False, True])
def test_a_compiled_run_whose_network_fell_back_writes_its_table_and_fails(tmp_path, monkeypatch, fell_back):
    """--compile: a network that fell back to eager makes the table time eager code; the run says so and exits 1."""
    from click.testing import CliRunner
    checkout = tmp_path / 'next3d'
    (checkout / 'training_avatar_texture').mkdir(parents=True)
    (checkout / 'training_avatar_texture' / 'triplane_next3d.py').write_text('')
    compile_log = ['torch.compile: D compiled for a new input signature in 3.0 s (matches eager)']
    if fell_back:
        compile_log.append('RuntimeWarning: torch.compile: G.synthesis failed its check against eager (...); running it eagerly from now on.')
    phases = {name: (1.0, 1.0) for name, _ in vs_original.PHASES}
    samples = {side: dict(train=[phases], infer=[(1.0, 1.0)]) for side in ('ours', 'original')}
    profiles = {side: dict(total_ms=1.0, top=[]) for side in ('ours', 'original')}
    info = dict(ours=dict(params=[1, 1], peak_rss_gib=1.0, compile_log=compile_log), original=dict(params=[1, 1], peak_rss_gib=1.0))
    monkeypatch.setattr(vs_original, 'make_inputs', lambda *a: None)
    monkeypatch.setattr(vs_original, 'run_preset', lambda *a: (samples, profiles, info))
    outdir = tmp_path / 'out'
    result = CliRunner().invoke(vs_original.main, ['--original-src', str(checkout), '--compile', 'all', '--pairs', '1',
                                                   '--outdir', str(outdir)])
    written = list(outdir.glob('vs_original-cpu-*-compile-all.md'))
    assert len(written) == 1         # the table is written either way
    assert '| next3d | inference (wall) | 1.000 | 1.000 | 1.00 | 1.00x | 1.00-1.00x |' in written[0].read_text()
    if fell_back:
        assert result.exit_code == 1
        assert result.stderr.strip().startswith('Error: --compile=all: 1 network(s) fell back to eager mode (the compile log in ')
    else:
        assert result.exit_code == 0, result.output


def test_geometry_in_loader_reaches_our_side_and_is_said_in_the_table(tmp_path, monkeypatch):
    from click.testing import CliRunner
    checkout = tmp_path / 'next3d'
    (checkout / 'training_avatar_texture').mkdir(parents=True)
    (checkout / 'training_avatar_texture' / 'triplane_next3d.py').write_text('')
    phases = {name: (1.0, 1.0) for name, _ in vs_original.PHASES}
    samples = {side: dict(train=[phases], infer=[(1.0, 1.0)]) for side in ('ours', 'original')}
    profiles = {side: dict(total_ms=1.0, top=[]) for side in ('ours', 'original')}
    info = dict(ours=dict(params=[1, 1], peak_rss_gib=1.0), original=dict(params=[1, 1], peak_rss_gib=1.0))
    configs = []
    monkeypatch.setattr(vs_original, 'make_inputs', lambda *a: None)
    monkeypatch.setattr(vs_original, 'run_preset', lambda preset, cfg, *a: configs.append(dict(cfg)) or (samples, profiles, info))
    outdir = tmp_path / 'out'
    result = CliRunner().invoke(vs_original.main, ['--original-src', str(checkout), '--geometry-in-loader', '--pairs', '1',
                                                   '--outdir', str(outdir)])
    assert result.exit_code == 0, result.output
    assert [c['geometry_in_loader'] for c in configs] == [True]
    written = list(outdir.glob('vs_original-cpu-*-geometry-in-loader.md'))
    assert len(written) == 1
    text = written[0].read_text()
    assert '--geometry-in-loader' in text and "given its meshes' geometry made beforehand and not timed" in text


def _busy(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_stage_seconds_times_modules_and_methods_then_removes_its_timers():
    import torch

    class Busy(torch.nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            _busy(self.seconds)
            return x

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Module()
            self.backbone.synthesis = Busy(0.03)
            self.renderer = Busy(0.01)

        def rasterize(self, x):
            _busy(0.02)
            return x

    class Side:
        G = Net()

        def infer(self):
            x = self.G.backbone.synthesis(1)
            x = self.G.rasterize(x)
            x = self.G.renderer(x)
            _busy(0.01)                         # outside every stage

    side = Side()
    seconds = vs_original.stage_seconds(side, [('backbone', 'backbone.synthesis'), ('raster', 'rasterize()'), ('render', 'renderer')], calls=2)
    assert list(seconds) == ['backbone', 'raster', 'render', 'rest', 'inference']
    for label, expected in (('backbone', 0.03), ('raster', 0.02), ('render', 0.01), ('rest', 0.01), ('inference', 0.07)):
        assert expected <= seconds[label] < expected + 0.01, (label, seconds[label])
    assert 'rasterize' not in vars(side.G)      # the method is the class's again, the hooks gone
    assert not side.G.renderer._forward_hooks and not side.G.renderer._forward_pre_hooks
    own = lambda x: _busy(0.02) or x             # a method set on the instance is put back
    side.G.rasterize = own
    assert vs_original.stage_seconds(side, [('raster', 'rasterize()')], calls=1)['raster'] >= 0.02
    assert vars(side.G)['rasterize'] is own


def test_stage_table_lists_the_stages_the_rest_and_the_whole_inference():
    stages = dict(ours=dict(texture=0.1, renderer=0.2, rest=0.1, inference=0.4), original=dict(texture=0.3, renderer=1.0, rest=0.3, inference=1.6))
    text = '\n'.join(vs_original.stage_table('next3d', stages))
    assert '| texture | 0.100 | 0.300 | 3.00x |' in text
    assert '| renderer | 0.200 | 1.000 | 5.00x |' in text
    assert '| the rest (outside these stages) | 0.100 | 0.300 | 3.00x |' in text
    assert '| **inference** | 0.400 | 1.600 | 4.00x |' in text
