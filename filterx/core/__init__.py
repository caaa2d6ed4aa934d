"""Layer 1, imports nothing else of filterx: fault points, progress lines, portable numerics,
the torchrun runtime (device, ranks, seeds) and the collectives that run on it.
"""
