"""Offline-capable quality metrics: fidelity to an uncached reference, and semantic checks on digits."""
