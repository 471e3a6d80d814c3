"""Local text corpora for training tiny models and for benchmarks (no downloads)."""

from .corpus import LANGUAGES, documents, text

__all__ = ["LANGUAGES", "documents", "text"]
