"""Fused operations of the generator and discriminator.

Every op has a plain-PyTorch reference that defines the maths (exact, differentiable to
any order, any device and float dtype) and a CUDA implementation of our own, registered
through `torch.library`. `impl=None` picks the CUDA kernel for CUDA tensors when the
extension builds, else the reference; `impl='ref'` or the environment variable
`NEXT3D_OPS_REF=1` forces the reference. See `_build.py` for the dispatch rules.
"""
