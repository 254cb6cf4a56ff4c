"""Causal-mode KV caches and frame-selection policies (not yet implemented)."""
