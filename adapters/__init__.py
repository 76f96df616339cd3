"""Adapter registry: metadata models, blob store and upload validation (no torch)."""
