"""minispatial: tiny CLIP-style dual encoders learning left/right, written by hand in NumPy."""

__version__ = "0.1.0"
