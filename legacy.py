"""`legacy.load_network_pkl`, the name EG3D/StyleGAN users know; the code lives in
training/network_pickle.py (the library never imports this script-level module)."""

from training.network_pickle import load_network_pkl

__all__ = ['load_network_pkl']
