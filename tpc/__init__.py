"""tpc: the token-pruning compiler."""

__version__ = "0.1.0"
