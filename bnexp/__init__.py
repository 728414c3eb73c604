"""bnexp: paired Batch Normalization experiments on a population engine."""

__version__ = "0.1.0"
