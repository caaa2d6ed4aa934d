"""filterx: pick the part of a large image pool that serves a small target dataset.

Stages (each a library function with a thin ``filterx`` command over it):
shard -> train-encoder -> embed -> score -> select -> pretrain / finetune.
"""

__version__ = "0.1.0"
