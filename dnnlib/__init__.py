"""Small utilities shared by every script (EasyDict, class construction, file access, logging)."""

from .util import EasyDict, Logger, make_cache_dir_path, open_url, parse_range, parse_vec2

__all__ = ["EasyDict", "Logger", "make_cache_dir_path", "open_url", "parse_range", "parse_vec2"]
