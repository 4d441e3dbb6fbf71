"""orchestratord: the llorch-kit control daemon (node registry, model catalog, placement)."""

__version__ = "0.1.0"
