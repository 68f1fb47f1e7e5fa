"""Tri-plane volume rendering: rays from cameras, samples along them, compositing.

    ray_sampler.RaySampler        cameras -> rays (world units, OpenCV cameras)
    ray_marcher.MipRayMarcher2    samples along rays -> composited features and depth
    renderer.ImportanceRenderer   tri-plane + decoder -> features, depth, weights per ray
"""
