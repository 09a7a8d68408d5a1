"""The installed rwkv-cli's version, for modules that record it (state files, the Hub's user agent)
without importing the package's public API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rwkv-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
