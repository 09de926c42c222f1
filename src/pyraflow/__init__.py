"""pyraflow: pyramidal flow matching with a multi-stage MMDiT over packed, token-balanced batches."""

__version__ = "0.1.0"
