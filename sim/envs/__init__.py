"""Env registry: ``make_env(suite, task, **kw)`` and ``list_tasks(suite)``.

A suite registers a factory and a task lister; both are imported lazily so that importing
``sim.envs`` does not pull in MuJoCo (or a LIBERO / SIMPLER stack) until an env is made.
To add a suite::

    register_suite("libero", tasks=lambda: [...], factory=lambda task, **kw: LiberoEnv(task, **kw))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from sim.envs.base import LanguageConditionedEnv


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: Callable[[], list[str]]
    factory: Callable[..., LanguageConditionedEnv]


_SUITES: dict[str, Suite] = {}


def register_suite(
    name: str,
    tasks: Callable[[], list[str]],
    factory: Callable[..., LanguageConditionedEnv],
) -> None:
    """Register a suite; `factory(task, **kw)` builds one env of that suite."""
    if name in _SUITES:
        raise ValueError(f"suite {name!r} is already registered")
    _SUITES[name] = Suite(name, tasks, factory)


def list_suites() -> list[str]:
    return sorted(_SUITES)


def _suite(name: str) -> Suite:
    if name not in _SUITES:
        raise ValueError(f"unknown suite {name!r}; registered suites: {list_suites()}")
    return _SUITES[name]


def list_tasks(suite: str) -> list[str]:
    """Task names of `suite`, e.g. ``["press", "push", "pick_place", "stack"]``."""
    return list(_suite(suite).tasks())


def make_env(suite: str, task: str, **kw: Any) -> LanguageConditionedEnv:
    """Build one env; keyword arguments go to the suite's factory (e.g. ``image_size=96``)."""
    s = _suite(suite)
    tasks = list_tasks(suite)
    if task not in tasks:
        raise ValueError(f"unknown task {task!r} for suite {suite!r}; choose from {tasks}")
    return s.factory(task, **kw)


def _embedded_tasks() -> list[str]:
    from sim.envs.embedded import TASKS

    return list(TASKS)


def _embedded_env(task: str, **kw: Any) -> LanguageConditionedEnv:
    from sim.envs.embedded import EmbeddedEnv

    return EmbeddedEnv(task, **kw)


register_suite("embedded", tasks=_embedded_tasks, factory=_embedded_env)
# Adapter modules are light; LIBERO / SimplerEnv themselves are imported only when an env is made.
register_suite(
    "libero",
    tasks=lambda: import_module("sim.envs.libero").task_names(),
    factory=lambda task, **kw: import_module("sim.envs.libero").LiberoEnv(task, **kw),
)
register_suite(
    "simpler",
    tasks=lambda: import_module("sim.envs.simpler").task_names(),
    factory=lambda task, **kw: import_module("sim.envs.simpler").SimplerEnv(task, **kw),
)

__all__ = ["LanguageConditionedEnv", "list_suites", "list_tasks", "make_env", "register_suite"]
