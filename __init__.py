"""lt-distill: offline CLIP soft labels for long-tailed detection (RichSem, cached)."""

__version__ = "0.1.0"
