"""Re-plot an eval run from its episodes.jsonl: ``python -m sim.report OUT``."""

from __future__ import annotations

import sys

from sim.eval.summary import format_table, main, report

__all__ = ["format_table", "main", "report"]

if __name__ == "__main__":
    sys.exit(main())
