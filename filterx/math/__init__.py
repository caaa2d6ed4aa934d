"""Layer 2 (core, kernels): array math with no file I/O: k-means, the inverse-Hessian-vector
product solvers, head influence, the target probe's fit, stratified splits.
"""
