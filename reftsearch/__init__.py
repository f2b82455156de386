"""reftsearch: automatic search for the best ReFT intervention configuration."""

__version__ = "0.1.0"
