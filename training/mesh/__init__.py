"""Meshes: OBJ/landmark I/O, the FLAME-format model loader and layer, rasterization."""
