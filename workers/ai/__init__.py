"""The AI worker: batched VAD, turn-taking, barge-in and one Live session per call, many calls per process.

Modules: ``vad`` (batched Silero on onnxruntime), ``turns`` (onset/offset decisions, pre-roll),
``greeting`` (cached spoken prompts), ``worker`` (the per-shard event loop over the shm slot table),
``main`` (the ``voice-appliance ai-worker`` subcommand); ``live`` is the Gemini Live session layer.
"""
