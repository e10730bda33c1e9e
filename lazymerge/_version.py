"""lazymerge's version: the ground floor (imports nothing), so any module may name it without
importing the package root."""

__version__ = "0.1.0"
