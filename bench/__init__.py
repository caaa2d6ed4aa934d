"""filterx benchmarks.

``python -m bench`` runs the suites registered in ``bench.suite`` (decode, embed, kernels,
influence, trainer), prints one table per suite and writes results files named for the machine
and setup under ``bench/results``. See bench/README.md.
"""
