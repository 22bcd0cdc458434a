"""The package version, apart so that modules below the package root can read it without importing it."""

__version__ = "0.1.0.dev0"
