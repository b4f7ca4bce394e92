"""Shared-memory segment per shard: slot table and lock-free SPSC audio rings."""
