"""Voice appliance: WebRTC callers talking live with Gemini Live models on one Debian box.

The supervisor (this package) is the control plane and the only public API; media and AI workers
live in ``workers/``, the shared-memory rings between them in ``shm/``.
"""

__version__ = "0.1.0"
