"""pretrained_models/bundle_snapshot.py: a snapshot -> the bundled file read back; its one-line errors."""

import torch
from click.testing import CliRunner

from pretrained_models import bundle_snapshot as bs
from torch_utils import persistence
from training.configs import make_generator


def write_snapshot(path):
    torch.manual_seed(0)
    G = make_generator('tiny64').eval()
    persistence.save_checkpoint(str(path), dict(
        G=G, D=None, G_ema=G, training_set_kwargs=dict(path='/some/machine/data.zip', resolution=64),
        resume_state=dict(cur_nimg=1000, optimizers=dict(G=dict(state=[torch.ones(3)])))))
    return G


def test_bundle_drops_the_resume_state_and_keeps_the_weights(tmp_path):
    G = write_snapshot(tmp_path / 'snap.pkl')
    out = tmp_path / 'bundled.pkl'
    result = CliRunner().invoke(bs.main, [str(tmp_path / 'snap.pkl'), str(out), '--data', 'datasets/x.zip'])
    assert result.exit_code == 0, result.output
    data = persistence.load_checkpoint(str(out))
    assert sorted(data) == ['D', 'G', 'G_ema', 'training_set_kwargs']
    assert data['training_set_kwargs'] == dict(path='datasets/x.zip', resolution=64)
    for name, p in G.state_dict().items():
        assert torch.equal(data['G_ema'].state_dict()[name], p), name


def test_bundle_refuses_to_replace_without_force(tmp_path):
    write_snapshot(tmp_path / 'snap.pkl')
    out = tmp_path / 'bundled.pkl'
    out.write_bytes(b'keep me')
    result = CliRunner().invoke(bs.main, [str(tmp_path / 'snap.pkl'), str(out)])
    assert result.exit_code == 1
    assert result.output.strip() == f'Error: {out}: exists (pass --force to replace it)'
    assert out.read_bytes() == b'keep me'
    (tmp_path / 'link.pkl').symlink_to(tmp_path / 'snap.pkl')        # another name for the same file
    result = CliRunner().invoke(bs.main, [str(tmp_path / 'snap.pkl'), str(tmp_path / 'link.pkl'), '--force'])
    assert result.exit_code == 1
    assert result.output.strip() == f'Error: {tmp_path / "link.pkl"}: is the snapshot itself (its resume state would be lost): choose another output'
    assert 'resume_state' in persistence.load_checkpoint(str(tmp_path / 'snap.pkl'))
    result = CliRunner().invoke(bs.main, [str(tmp_path / 'snap.pkl'), str(out), '--force'])
    assert result.exit_code == 0, result.output
    assert 'resume_state' not in persistence.load_checkpoint(str(out))


def test_bundle_errors_are_one_line(tmp_path):
    missing = tmp_path / 'missing.pkl'
    result = CliRunner().invoke(bs.main, [str(missing), str(tmp_path / 'out.pkl')])
    assert result.exit_code == 1 and result.output.strip() == f'Error: {missing}: no such checkpoint file'
    persistence.save_checkpoint(str(tmp_path / 'options.pkl'), dict(training_set_kwargs={}))
    result = CliRunner().invoke(bs.main, [str(tmp_path / 'options.pkl'), str(tmp_path / 'out.pkl')])
    assert result.exit_code == 1
    assert result.output.strip() == f'Error: {tmp_path / "options.pkl"}: not a training snapshot (no G, D, G_ema)'
    assert not (tmp_path / 'out.pkl').exists()
