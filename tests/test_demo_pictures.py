"""docs/demo_pictures.py: a fake demo folder -> the four pictures read back; a missing file is one line."""

import os

import numpy as np
import PIL.Image
from click.testing import CliRunner

from docs import demo_pictures as dp
from training.video import VideoWriter


def write_video(path, colours):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with VideoWriter(str(path), fps=30) as video:
        for colour in colours:
            video.append(np.full((32, 48, 3), colour, dtype=np.uint8))


def test_pictures_from_a_demo_folder(tmp_path):
    out = tmp_path / 'out'
    (out / 'samples').mkdir(parents=True)
    for seed in range(4):
        PIL.Image.fromarray(np.full((16, 48, 3), 10 * seed, dtype=np.uint8)).save(out / 'samples' / f'seed{seed:04d}.png')
    PIL.Image.fromarray(np.full((8, 32, 3), 77, dtype=np.uint8)).save(out / 'samples' / 'depth.png')
    write_video(out / 'orbit' / 'interpolation.mp4', [200, 100, 50])
    openings = dp.lip_openings(dp.BUNDLED_DRIVING)
    assert len(openings) == 32 and openings.max() > 10 * openings.min() > 0
    colours = [7 * k for k in range(32)]            # frame k has grey level 7k
    write_video(out / 'reenact' / 'reenact.mp4', colours)
    dest = tmp_path / 'docs'
    result = CliRunner().invoke(dp.main, [str(out), '--dest', str(dest)])
    assert result.exit_code == 0, result.output

    seeds = np.asarray(PIL.Image.open(dest / 'demo_seeds.png'))
    assert seeds.shape == (64, 48, 3) and [int(seeds[16 * k, 0, 0]) for k in range(4)] == [0, 10, 20, 30]
    assert np.asarray(PIL.Image.open(dest / 'demo_depth.png')).shape == (8, 32, 3)
    assert abs(int(np.asarray(PIL.Image.open(dest / 'demo_orbit_frame.png'))[5, 5, 0]) - 200) <= 3
    reenact = np.asarray(PIL.Image.open(dest / 'demo_reenact_frame.png')).astype(int)
    assert reenact.shape == (64, 48, 3)
    assert abs(reenact[16, 24, 0] - colours[int(openings.argmin())]) <= 3    # closed mouth on top
    assert abs(reenact[48, 24, 0] - colours[int(openings.argmax())]) <= 3    # widest open below


def test_a_reenactment_of_another_driving_folder_is_one_line(tmp_path):
    out = tmp_path / 'out'
    (out / 'samples').mkdir(parents=True)
    for name in [f'seed{seed:04d}.png' for seed in range(4)] + ['depth.png']:
        PIL.Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(out / 'samples' / name)
    write_video(out / 'orbit' / 'interpolation.mp4', [0])
    write_video(out / 'reenact' / 'reenact.mp4', [0] * 5)
    result = CliRunner().invoke(dp.main, [str(out), '--dest', str(tmp_path / 'docs')])
    assert result.exit_code == 1
    assert result.output.strip() == f'Error: {out / "reenact" / "reenact.mp4"}: 5 frames, but the driving folder has 32'
    assert not (tmp_path / 'docs').exists()


def test_a_missing_demo_output_is_one_line(tmp_path):
    result = CliRunner().invoke(dp.main, [str(tmp_path), '--dest', str(tmp_path / 'docs')])
    assert result.exit_code == 1
    assert result.output.strip() == f'Error: {tmp_path / "samples" / "seed0000.png"}: missing (run make demo first)'
    assert not (tmp_path / 'docs').exists()
