"""The version of gaqprune (recorded in every checkpoint, importance record and dense-perplexity cache entry)."""

__version__ = "0.1.0"
