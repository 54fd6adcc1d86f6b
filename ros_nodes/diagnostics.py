"""Counters and latency percentiles of the policy node, and their diagnostic_msgs form.

`NodeStats` is plain Python (thread-safe, bounded memory); `to_diagnostic_array` builds the
`diagnostic_msgs/DiagnosticArray` the node publishes: one status for control (latency, misses,
safe and late actions, acceleration level; ERROR while the budget is infeasible: below the
fastest level's measured p90) and one for inputs (rejected messages by reason).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class NodeStats:
    window: int = 200
    steps: int = 0  # policy actions published (in time, or late with on_infeasible: late)
    late_actions: int = 0  # of those, published after their deadline (frame_id policy/late)
    deadline_misses: int = 0  # steps whose result was not ready by the deadline
    safe_actions: Counter = field(default_factory=Counter)  # reason -> count
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    last_rejection: str = ""
    level: int = 0
    level_name: str = ""
    kept_tokens: int = 0
    budget_ms: float = 0.0
    levels: int = 0  # levels on the measured front
    fastest_p90_ms: float = 0.0  # the fastest level's measured p90 at configure
    infeasible: str = ""  # why the budget cannot be met ("" = it can)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._latency: deque[float] = deque(maxlen=self.window)
        self._policy_ms: deque[float] = deque(maxlen=self.window)
        self._recent_misses: deque[bool] = deque(maxlen=self.window)

    def finished(self, latency_ms: float, policy_ms: float, missed: bool) -> None:
        """A policy step finished (in time or late): its latency goes into the percentiles."""
        with self._lock:
            self._latency.append(latency_ms)
            self._policy_ms.append(policy_ms)
            self._recent_misses.append(missed)

    def missed(self) -> None:
        with self._lock:
            self.deadline_misses += 1

    def published(self, late: bool = False) -> None:
        with self._lock:
            self.steps += 1
            self.late_actions += late

    def safe(self, reason: str) -> None:
        with self._lock:
            self.safe_actions[reason] += 1

    def reject(self, reason: str, detail: str) -> None:
        with self._lock:
            self.rejected[reason] += 1
            self.last_rejection = f"{reason}: {detail}"[:200]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = np.asarray(self._latency, dtype=np.float64)
            pol = np.asarray(self._policy_ms, dtype=np.float64)
            recent = sum(self._recent_misses)
            out: dict[str, Any] = {
                "steps": self.steps,
                "late_actions": self.late_actions,
                "deadline_misses": self.deadline_misses,
                "recent_miss_rate": recent / max(len(self._recent_misses), 1),
                "safe_actions_total": sum(self.safe_actions.values()),
                "rejected_total": sum(self.rejected.values()),
                "level": self.level,
                "level_name": self.level_name,
                "kept_tokens": self.kept_tokens,
                "budget_ms": self.budget_ms,
                "levels": self.levels,
                "fastest_p90_ms": self.fastest_p90_ms,
                "infeasible": self.infeasible,
            }
            for name, x in (("latency", lat), ("policy", pol)):
                for q in (50, 90, 99):
                    out[f"{name}_p{q}_ms"] = float(np.percentile(x, q)) if x.size else 0.0
            out.update({f"safe_{k}": v for k, v in sorted(self.safe_actions.items())})
            out.update({f"rejected_{k}": v for k, v in sorted(self.rejected.items())})
            out["last_rejection"] = self.last_rejection
            return out


class StepLog:
    """One JSON line per finished policy step (benchmarks, offline analysis); thread-safe."""

    def __init__(self, path: str):
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"t": round(time.time(), 6), **record})
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def to_diagnostic_array(snap: dict[str, Any], stamp: Any, node: str, state: str):
    """The node's DiagnosticArray: "<node>: control" and "<node>: inputs" statuses."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    def kv(keys):
        return [KeyValue(key=k, value=_fmt(snap[k])) for k in keys]

    control_keys = [k for k in snap if not k.startswith("rejected") and k != "last_rejection"]
    control = DiagnosticStatus(name=f"{node}: control", hardware_id=node)
    control.values = [KeyValue(key="state", value=state)] + kv(control_keys)
    if state != "active":
        control.level, control.message = DiagnosticStatus.STALE, f"not controlling ({state})"
    elif snap["infeasible"]:
        control.level, control.message = DiagnosticStatus.ERROR, snap["infeasible"]
    elif snap["recent_miss_rate"] > 0:
        control.level = DiagnosticStatus.WARN
        control.message = f"deadline misses: {snap['recent_miss_rate']:.1%} of recent steps"
    else:
        control.level, control.message = DiagnosticStatus.OK, "ok"
    inputs = DiagnosticStatus(name=f"{node}: inputs", hardware_id=node)
    inputs.values = kv([k for k in snap if k.startswith("rejected")] + ["last_rejection"])
    inputs.level = DiagnosticStatus.WARN if snap["rejected_total"] else DiagnosticStatus.OK
    inputs.message = snap["last_rejection"] or "ok"
    msg = DiagnosticArray(status=[control, inputs])
    msg.header.stamp = stamp
    return msg


def diagnostic_values(msg: Any) -> dict[str, dict[str, str]]:
    """DiagnosticArray -> {status name suffix ("control", "inputs"): {key: value}}."""
    return {
        s.name.rsplit(": ", 1)[-1]: {v.key: v.value for v in s.values} for s in msg.status
    }


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
