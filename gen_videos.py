"""gen_videos: filled in by a later issue."""

import sys

if __name__ == '__main__':
    print('gen_videos.py: not implemented yet', file=sys.stderr)
    sys.exit(2)
