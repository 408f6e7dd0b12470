"""Pure PyTorch two-tower library: towers, similarities, losses, samplers, metrics, config.

Imports torch and numpy only: no ray, no file I/O (tests/unit/test_core_purity.py checks).
"""
