"""The media worker: RTP/Opus between Janus and a shard's shared-memory rings (see worker.py)."""
