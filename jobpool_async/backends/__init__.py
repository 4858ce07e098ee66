"""Storage backends. ``base.Backend`` is the contract; each module implements it."""

from .base import Backend
from .memory import MemoryBackend

__all__ = ["Backend", "MemoryBackend"]
