"""Locating model files that ship inside Python wheels, without importing their packages.

The Silero VAD ONNX model comes from the ``silero-vad`` wheel, installed with ``--no-deps``: importing
``silero_vad`` itself would import torch, which the appliance never installs. ``find_spec`` locates the
package directory without executing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def silero_vad_onnx_path() -> Path:
    """Path of ``silero_vad.onnx`` inside the installed silero-vad wheel; a clear error if missing."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "silero-vad is not installed: pip install --no-deps 'silero-vad==6.2.3' "
            "(only its ONNX model is used)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "silero_vad.onnx"
        if path.exists():
            return path
    raise FileNotFoundError("silero_vad.onnx not found inside the silero-vad package")
