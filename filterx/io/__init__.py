"""Layer 3 (core, kernels, math): the on-disk contracts: atomic writes, tars, the row store,
the dataset directory and its classes, the scores store, manifest formats, sample data.
"""
