"""Data: the synthetic catalog, table -> shard preparation, and the streaming pipeline."""
