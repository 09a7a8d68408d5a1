"""rwkv-cli: run RWKV language models from the terminal."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rwkv-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
