"""Layer 4 (below it: core, kernels, math, io): decode backends that turn a dataset's tars
into batches for a rank.
"""
