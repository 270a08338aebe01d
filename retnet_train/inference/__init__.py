"""Inference: the batched decoding engine (engine.py), device-side sampling (sampling.py) and the
CUDA graphs of the decoding step (graphs.py)."""

from .engine import Generator

__all__ = ["Generator"]
