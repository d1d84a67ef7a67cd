"""The single source of jaxnorm's version (read by pyproject.toml)."""

__version__ = "0.1.0"
