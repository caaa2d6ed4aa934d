"""Layer 8 (everything below): the pipeline stages shard, embed, score, select (and probe,
demo), each one library function over a small config.
"""
