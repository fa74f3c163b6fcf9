"""The one version string of the package.

Kept in a module of its own, at the bottom of the layers, so that ``luod``
(server) and ``luoctl`` (CLI) can both name it without importing the client
library that ``liveupdate/__init__.py`` exposes. ``pyproject.toml`` reads it
from here (``tool.setuptools.dynamic``), and ``liveupdate.__version__``
re-exports it.
"""

__version__ = "0.1.0"
