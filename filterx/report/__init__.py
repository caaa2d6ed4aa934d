"""Layer 9 (everything below): ``filterx report`` and ``filterx info``: what a dataset dir
holds, scores' histograms, overlaps and thumbnails.
"""
