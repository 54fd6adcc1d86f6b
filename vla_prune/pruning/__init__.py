"""Visual-token pruning strategies behind one protocol (see base.py)."""

from . import strategies  # noqa: F401  (registers the built-in methods)
