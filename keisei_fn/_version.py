"""keisei_fn's version, in a leaf module: the sidecar records it (``keisei_fn.meta``), which must
not import the package root (that imports everything)."""

__version__ = "0.1.0"
