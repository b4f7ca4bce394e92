"""Per-shard worker processes: the media worker (RTP/Opus ↔ rings) and the AI worker (rings ↔ Live)."""
