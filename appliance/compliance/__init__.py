"""Compliance controls (docs/compliance.md): encryption at rest, the audit chain."""
