"""Small utilities shared by every script (EasyDict, class construction, file access, logging)."""

from .util import EasyDict, Logger, construct_class_by_name, get_obj_by_name, open_url, make_cache_dir_path

__all__ = ['EasyDict', 'Logger', 'construct_class_by_name', 'get_obj_by_name', 'open_url', 'make_cache_dir_path']
