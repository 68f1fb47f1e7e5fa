"""Fused and custom operations of the generator and discriminator.

bias_act and upfirdn2d (and filtered_lrelu, their composition) have a plain-PyTorch
reference that defines the maths (exact, differentiable to any order, any device and float
dtype) and a CUDA implementation of our own, registered through `torch.library`.
`impl=None` picks the CUDA kernel for CUDA tensors when the extension builds, else the
reference; `impl='ref'` or the environment variable `NEXT3D_OPS_REF=1` forces the
reference. See `_build.py` for the dispatch rules.

The others are written with PyTorch's own ops: conv2d_resample and fma as plain
compositions, and with autograd of our own where PyTorch's is slow or missing:
bilinear_mean (the planes' and texture's sampling), conv2d_double_backward (R1's second
derivative) and grid_sample (a second derivative that PyTorch 2.4 and 2.11 lack).
"""
