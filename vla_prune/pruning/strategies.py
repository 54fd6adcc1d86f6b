"""Imports every built-in strategy so that its @register runs."""

from . import divprune, efficientvla, fastv, simple, sparsevlm, vla_cache, vla_pruner  # noqa: F401
