"""MP4 writing through imageio-ffmpeg's bundled ffmpeg (no system ffmpeg needed)."""

import imageio
import numpy as np

from torch_utils.persistence import atomic_output


class VideoWriter:
    """Write uint8 HWC frames to an mp4 that appears under `path` only once complete.

        with VideoWriter('out.mp4', fps=60) as video:
            video.append(frame)
    """

    def __init__(self, path: str, fps: int = 60, bitrate: str = '10M', codec: str = 'libx264'):
        self.path = path
        self._output = atomic_output(path, suffix='.mp4')
        self.tmp = self._output.__enter__()
        self.writer = imageio.get_writer(self.tmp, format='FFMPEG', mode='I', fps=fps, codec=codec, bitrate=bitrate,
                                         macro_block_size=2, ffmpeg_log_level='error')
        self.num_frames = 0

    def append(self, frame: np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f'frames must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}')
        self.writer.append_data(frame)
        self.num_frames += 1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.writer.close()
        self._output.__exit__(exc_type, exc, tb)


def read_video_frames(path: str) -> list:
    """All frames of a video as uint8 (H, W, 3) arrays."""
    reader = imageio.get_reader(path, format='FFMPEG')
    try:
        return [np.asarray(frame) for frame in reader]
    finally:
        reader.close()
