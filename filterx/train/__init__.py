"""Layer 7 (below it: core .. models, scorers): pre-training and fine-tuning loops, their
data sources and checkpoints.
"""
