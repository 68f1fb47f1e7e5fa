"""EasyDict, `open_url`, and a stdout/stderr tee. (No lookup of objects by dotted name: see training/builders.py.)"""

import hashlib
import io
import os
import sys
import urllib.parse
import urllib.request


class EasyDict(dict):
    """A dict whose keys are also attributes: `d.lr` is `d['lr']`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


def make_cache_dir_path(*paths: str) -> str:
    """A folder for cached files: $NEXT3D_CACHE_DIR, else $XDG_CACHE_HOME/next3d, else ~/.cache/next3d."""
    root = os.environ.get('NEXT3D_CACHE_DIR')
    if root is None:
        root = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.join(os.path.expanduser('~'), '.cache')), 'next3d')
    return os.path.join(root, *paths)


def open_url(url: str, cache: bool = True, cache_dir: str = None):
    """Open a local path, a file:// URL, or an http(s) URL (downloaded once into the cache).

    Returns a binary file object. Local files that do not exist raise FileNotFoundError
    naming the path. Tests never use the download path.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ('', 'file') or (len(parsed.scheme) == 1 and os.name == 'nt'):
        path = urllib.request.url2pathname(parsed.path) if parsed.scheme == 'file' else url
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: no such file')
        return open(path, 'rb')
    if parsed.scheme not in ('http', 'https'):
        raise ValueError(f'{url}: unsupported URL scheme {parsed.scheme!r}')
    cache_dir = cache_dir or make_cache_dir_path('downloads')
    cache_file = os.path.join(cache_dir, hashlib.md5(url.encode()).hexdigest() + '_' + os.path.basename(parsed.path))
    if cache and os.path.isfile(cache_file):
        return open(cache_file, 'rb')
    with urllib.request.urlopen(url) as response:
        data = response.read()
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = cache_file + f'.tmp{os.getpid()}'
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, cache_file)
    return io.BytesIO(data)


class Logger:
    """Tee stdout and stderr into a log file (the run folder's log.txt). Use as a context manager."""

    def __init__(self, file_name: str = None, file_mode: str = 'w', should_flush: bool = True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout = self
        sys.stderr = self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write(self, text: str) -> int:
        if not text:
            return 0
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()
        return len(text)

    def flush(self):
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def isatty(self):
        return False

    def close(self):
        self.flush()
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None


def parse_range(text) -> list:
    """'0-3,7' -> [0, 1, 2, 3, 7]; also accepts a list of ints (as click passes defaults)."""
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    values = []
    for part in str(text).split(','):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition('-')
        if sep and lo:
            if int(hi) < int(lo):
                raise ValueError(f'bad range {part!r}: end before start')
            values.extend(range(int(lo), int(hi) + 1))
        else:
            values.append(int(part))
    if not values:
        raise ValueError(f'no numbers in {text!r}')
    return values


def parse_vec2(text) -> tuple:
    """'4x2' or '4,2' -> (4, 2)."""
    if isinstance(text, (list, tuple)):
        return tuple(int(v) for v in text)
    for sep in ('x', ','):
        parts = str(text).split(sep)
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    raise ValueError(f'cannot parse {text!r} as WxH')


def optional_backend(variable: str, choices: tuple, what: str, on_cuda: bool) -> str:
    """What a backend='auto' runs: 'pytorch' (ours), unless the environment variable names one
    of `choices` and the tensors are on CUDA (optional backends are opt-in). A value that is
    not one of `choices` is refused on every device."""
    name = os.environ.get(variable, '').strip() or 'pytorch'
    if name not in choices:
        raise ValueError(f'{variable}={name!r} is not a {what} backend (expected {" or ".join([", ".join(choices[:-1]), choices[-1]])})')
    return name if on_cuda else 'pytorch'
