"""Command-line help of every script, and the synthetic generator's progress and worker count."""

import glob
import importlib
import os
import re

import click
import pytest
from click.testing import CliRunner

from dataset_preprocessing.synthetic import make_dataset
from metrics import metric_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_modules():
    """Every click script of the repository (top level, preprocessing, benchmarks) as a module name."""
    paths = glob.glob(os.path.join(ROOT, '*.py'))
    for folder in ('dataset_preprocessing', 'benchmarks'):
        paths += glob.glob(os.path.join(ROOT, folder, '**', '*.py'), recursive=True)
    names = []
    for path in sorted(paths):
        with open(path, encoding='utf-8') as f:
            if '@click.command' in f.read():
                names.append(os.path.splitext(os.path.relpath(path, ROOT))[0].replace(os.sep, '.'))
    return names


def script_command(module_name: str) -> click.Command:
    module = importlib.import_module(module_name)
    commands = [v for v in vars(module).values() if isinstance(v, click.Command) and v.callback.__module__ == module_name]
    assert len(commands) == 1, f'{module_name}: expected one click command, found {len(commands)}'
    return commands[0]


def parse_help(text: str) -> dict:
    """Options section of click's --help -> {option names as printed: help text without the [...] notes}."""
    entries, current = {}, None
    section = text.split('\nOptions:\n', 1)[1]
    for line in section.splitlines():
        match = re.match(r'^  (-\S.*?)(?:\s{2,}(.*))?$', line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2) or ''
        elif line.startswith('    ') and current is not None:
            entries[current] += ' ' + line.strip()
        elif line.strip() == '' or not line.startswith(' '):
            current = None          # the epilog starts after a blank line
    return {name: re.sub(r'(\s*\[[^\]]*\])+\s*$', '', help_text).strip() for name, help_text in entries.items()}


def test_all_scripts_are_found():
    names = script_modules()
    for expected in ('gen_samples', 'gen_videos', 'reenact_avatar', 'calc_metrics', 'train', 'dataset_tool', 'demo',
                     'dataset_preprocessing.preprocess_in_the_wild', 'dataset_preprocessing.synthetic.make_dataset'):
        assert expected in names


@pytest.mark.parametrize('module_name', script_modules())
def test_every_option_has_help(module_name):
    command = script_command(module_name)
    result = CliRunner().invoke(command, ['--help'], prog_name=module_name)
    assert result.exit_code == 0, result.output
    entries = parse_help(result.output)
    options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]
    assert len(entries) == len(options) + 1                  # + --help
    for name, help_text in entries.items():
        assert help_text, f'{module_name}: {name} has no help text'


def test_calc_metrics_lists_every_registered_metric(monkeypatch):
    import calc_metrics

    def metrics_help():
        entries = parse_help(CliRunner().invoke(calc_metrics.main, ['--help']).output)
        return next(text for name, text in entries.items() if name.startswith('--metrics'))
    for name in metric_main.list_valid_metrics():
        assert re.search(rf'\b{name}\b', metrics_help()), name
    # Built from the registry: a newly registered metric shows up.
    monkeypatch.setitem(metric_main._metric_dict, 'made_up_metric', lambda opts: None)
    try:
        importlib.reload(calc_metrics)
        assert 'made_up_metric' in metrics_help()
    finally:
        monkeypatch.undo()
        importlib.reload(calc_metrics)
    assert 'made_up_metric' not in metrics_help()


def test_make_dataset_progress_and_default_workers(tmp_path, monkeypatch):
    calls = []
    real = make_dataset.make_training_set
    monkeypatch.setattr(make_dataset, 'make_training_set', lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs))
    monkeypatch.setattr(make_dataset, 'available_cores', lambda: 1)
    result = CliRunner().invoke(make_dataset.main, ['--outdir', str(tmp_path / 'd'), '--count', '9', '--resolution', '16'])
    assert result.exit_code == 0, result.output
    assert calls[0][4] == 1                                  # min(cores, 8) workers
    assert 'images: 100%' in result.output and '9/9' in result.output
    assert 'Warning' not in result.output
    assert len(os.listdir(tmp_path / 'd' / 'images16x16' / '00000')) == 9


def test_make_dataset_warns_once_when_workers_exceed_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(make_dataset, 'available_cores', lambda: 1)
    monkeypatch.setattr(make_dataset, 'make_training_set', lambda *args, **kwargs: None)
    result = CliRunner().invoke(make_dataset.main, ['--outdir', str(tmp_path / 'd'), '--count', '9', '--workers', '3'])
    assert result.exit_code == 0, result.output
    assert result.output.count('Warning') == 1
    assert 'Warning: --workers=3 exceeds the cores available (1)' in result.output


def test_make_dataset_default_workers_are_capped(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(make_dataset, 'available_cores', lambda: 64)
    monkeypatch.setattr(make_dataset, 'make_training_set', lambda *args, **kwargs: calls.append(args))
    result = CliRunner().invoke(make_dataset.main, ['--outdir', str(tmp_path / 'd')])
    assert result.exit_code == 0, result.output
    assert calls[0][4] == make_dataset.MAX_DEFAULT_WORKERS == 8


def test_gpu_check_script_refuses_a_machine_without_a_gpu(tmp_path):
    # benchmarks/gpu_check.sh (the checks to run when a GPU machine is at hand) on this one.
    import subprocess
    import sys
    import torch
    if torch.cuda.is_available():
        pytest.skip('a CUDA device is present: the script would run its checks')
    out = tmp_path / 'out'
    result = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'gpu_check.sh')], capture_output=True, text=True,
                            env=dict(os.environ, PYTHON=sys.executable, OUT=str(out)), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f'Error: {sys.executable}: torch sees no CUDA device (or does not import); this script is for a GPU machine'
    assert not out.exists()                      # nothing written


@pytest.mark.parametrize('compile_mode', ['', '1', 'only', 'cudagraphs'])
def test_gpu_check_script_runs_its_steps_in_order(tmp_path, compile_mode):
    """The steps gpu_check.sh runs, with a stand-in Python that says it sees a GPU and logs its arguments;
    GPU_CHECK_COMPILE=only keeps the build and the compiled comparison, which gets the rest of the time;
    =cudagraphs the build, the cudagraphs test on the device and two comparisons through CUDA graphs, the
    one given the meshes' geometry first."""
    import subprocess
    fake = tmp_path / 'python'
    calls = tmp_path / 'calls.txt'
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" | tr -d "\\n" >> {calls}; echo >> {calls}\n')
    fake.chmod(0o755)
    out = tmp_path / 'out'
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), ORIGINAL_SRC=str(tmp_path), GPU_CHECK_COMPILE=compile_mode, GPU_CHECK_SECONDS='500')
    script = os.path.join(ROOT, 'benchmarks', 'gpu_check.sh')
    result = subprocess.run(['bash', script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line.split(' (limit')[0][3:] for line in result.stdout.splitlines() if line.startswith('== ') and '(limit' in line]
    everything = ['build', 'pytest-gpu', 'vs-original', 'train-ffhq512-eg3d', 'train-small128', 'profile-dreg-small128',
                  'train-small128-geometry', 'loader-geometry-small128', 'rasterize', 'ops']
    assert steps == {'': everything, '1': everything + ['vs-original-compiled'], 'only': ['build', 'vs-original-compiled'],
                     'cudagraphs': ['build', 'pytest-cudagraphs', 'vs-original-cudagraphs-geometry', 'vs-original-cudagraphs']}[compile_mode]
    if compile_mode == 'cudagraphs':
        runs = [line for line in calls.read_text().splitlines() if '--compile all --compile-backend cudagraphs' in line]
        # First given the meshes' geometry (G's synthesis one traced graph each way), then rasterizing in the step.
        assert len(runs) == 2 and all(run.startswith('benchmarks/vs_original.py --device cuda') for run in runs), runs
        assert runs[0].endswith(f'--geometry-in-loader --pairs 3 --batch 8 --outdir {out}'), runs
        assert '--geometry-in-loader' not in runs[1] and runs[1].endswith(f'--pairs 3 --batch 8 --outdir {out}'), runs
    if compile_mode == 'only':       # the run's 500 s less the build's (a moment here) and 5 s to spare
        limit = int(re.search(r'== vs-original-compiled \(limit (\d+) s\)', result.stdout).group(1))
        assert 485 <= limit <= 495, limit
    assert 'benchmarks/vs_original.py --device cuda --prepare' in calls.read_text()
    if compile_mode == 'only':       # refused: no checkout to compare with, or a value it does not know
        for bad, why in ((dict(ORIGINAL_SRC=''), 'needs ORIGINAL_SRC'), (dict(GPU_CHECK_COMPILE='0'), 'expected 1, only or cudagraphs')):
            result = subprocess.run(['bash', script], capture_output=True, text=True, env=dict(env, **bad), timeout=120)
            assert result.returncode == 2 and result.stderr.startswith('Error: GPU_CHECK_COMPILE=') and why in result.stderr, result.stderr


def test_train_step_benchmark_times_the_step_given_the_meshes_geometry(tmp_path):
    # benchmarks/train_step.py --geometry-in-loader: a second column, the phases given the geometry made beforehand.
    from click.testing import CliRunner
    from benchmarks import train_step
    result = CliRunner().invoke(train_step.main, ['--cfg', 'tiny64', '--batch', '2', '--device', 'cpu', '--repeats', '1',
                                                  '--geometry-in-loader', '--outdir', str(tmp_path)])
    assert result.exit_code == 0, result.output
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith('train_step-tiny64-geometry-in-loader-cpu-')
    text = (tmp_path / files[0]).read_text()
    assert '| phase | every N steps | rasterizing in the step seconds | geometry given seconds | ratio |' in text
    assert len([line for line in text.splitlines() if line.startswith(('| Gmain |', '| Greg |', '| Dmain |', '| Dreg |', '| step '))]) == 5
    for args, message in ((['--cfg', 'tiny64-eg3d'], 'takes no mesh geometry'), (['--cfg', 'tiny64-gaussian'], 'takes no mesh geometry'),
                          (['--compile', 'D'], 'time them in separate runs')):
        result = CliRunner().invoke(train_step.main, args + ['--device', 'cpu', '--geometry-in-loader', '--outdir', str(tmp_path)])
        assert result.exit_code == 2 and message in result.output, result.output


def test_train_step_benchmark_refuses_a_compile_backend_where_it_would_not_apply(tmp_path):
    from click.testing import CliRunner
    from benchmarks import train_step
    for backend in ('cudagraphs', 'inductor'):      # the default too, named without --compile
        result = CliRunner().invoke(train_step.main, ['--cfg', 'tiny64', '--device', 'cpu', '--outdir', str(tmp_path), '--compile-backend', backend])
        assert result.exit_code == 2 and '--compile-backend applies to --compile=D, G or all only' in result.output, result.output
    assert os.listdir(tmp_path) == []


def benchmark_result(command: click.Command, args: list, outdir, prefix: str) -> str:
    """Run a benchmark's CLI into an empty outdir; the text of the one result file it wrote (name starting with prefix)."""
    result = CliRunner().invoke(command, args + ['--outdir', str(outdir)])
    assert result.exit_code == 0, result.output
    files = os.listdir(outdir)
    assert len(files) == 1 and files[0].startswith(prefix), files
    return (outdir / files[0]).read_text()


def test_loader_geometry_benchmark_runs_train_py_both_ways(tmp_path):
    # benchmarks/loader_geometry.py: train.py on a rendered set, with and without --geometry-in-loader, s/kimg per tick.
    from benchmarks import loader_geometry
    text = benchmark_result(loader_geometry.main, ['--cfg', 'tiny64', '--batch', '2', '--workers', '1', '--kimg', '0.004',
                                                   '--tick', '0.002', '--repeats', '1'], tmp_path, 'loader_geometry-tiny64-cpu-')
    rows = [line for line in text.splitlines() if line.startswith(('| --geometry-in-loader |', '| in the step |'))]
    assert len(rows) == 2 and all(float(row.split('|')[3].split(',')[0]) > 0 for row in rows), text
    assert 'Median s/kimg: in the loader' in text
    assert loader_geometry.PRESETS == ['small128', 'tiny64']            # not EG3D, Gaussian or FLAME-sized presets
    result = CliRunner().invoke(loader_geometry.main, ['--cfg', 'tiny64', '--kimg', '0.002', '--tick', '0.002', '--outdir', str(tmp_path)])
    assert result.exit_code == 1 and 'reported no tick after the first' in result.output


def test_train_step_benchmark_profiles_a_phase(tmp_path):
    # benchmarks/train_step.py --profile: the phase's top ops with their input shapes, written with the timings.
    from benchmarks import train_step
    text = benchmark_result(train_step.main, ['--cfg', 'tiny64', '--batch', '2', '--device', 'cpu', '--repeats', '1',
                                              '--profile', 'Dreg'], tmp_path, 'train_step-tiny64-profile-Dreg-cpu-')
    assert '### Dreg: top 15 ops by self CPU ms, with their input shapes' in text
    rows = [line for line in text.splitlines() if line.startswith('| `aten::')]
    assert len(rows) >= 5 and any('convolution' in row for row in rows)
    assert all(row.count('|') >= 5 for row in rows)


def test_plane_sampling_benchmark_times_three_paths(tmp_path):
    # benchmarks/plane_sampling.py: the table path's two backwards and grid_sample, per thread count.
    from benchmarks import plane_sampling
    text = benchmark_result(plane_sampling.main, ['--rays', '8', '--depths', '4', '--plane-res', '8', '--channels', '4',
                                                  '--threads', '1,2', '--repeats', '1'], tmp_path, 'plane_sampling-cpu-')
    assert 'sparse and index_add equal to the bit' in text and '256 points' in text
    rows = [line.split('|')[1:-1] for line in text.splitlines() if line.startswith(('| 1 |', '| 2 |'))]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [(t, p) for t in '12' for p in plane_sampling.PATHS]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    assert all(r[5].strip() == '1.00x' for r in rows if r[1].strip() == 'grid_sample')
    assert all(rows[i][2] == rows[i + 1][2] for i in (0, 3))           # sparse and index_add: one forward, timed once
    result = CliRunner().invoke(plane_sampling.main, ['--threads', '1,x', '--outdir', str(tmp_path)])
    assert result.exit_code == 2 and "'1,x' is not a comma-separated list of integers" in result.output
    # Fewer points than a plane's texels: bilinear_mean would take grid_sample's path for all three.
    result = CliRunner().invoke(plane_sampling.main, ['--rays', '8', '--depths', '4', '--plane-res', '32', '--outdir', str(tmp_path)])
    assert result.exit_code == 2 and "256 points are fewer than a plane's 1024 texels" in result.output
    assert len(os.listdir(tmp_path)) == 1
