"""Held-out metrics and zero-shot minimal-pair scoring."""
