"""The version of gatewayd: the installed package's metadata, the one place it is kept
(pyproject.toml sets it; the .deb and the image carry it from there)."""

from __future__ import annotations

from importlib.metadata import version
from typing import Final

VERSION: Final = version("gatewayd")
