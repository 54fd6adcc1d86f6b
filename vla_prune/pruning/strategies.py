"""Imports every built-in strategy so that its @register runs."""

from . import divprune, fastv, simple, sparsevlm, vla_pruner  # noqa: F401
