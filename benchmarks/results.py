"""Where every CPU benchmark leaves its numbers: bench_out/NAME.json (gitignored)."""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path("bench_out")


def write_results(name: str, results: object) -> Path:
    """Write `results` as bench_out/NAME.json (indented JSON); its path."""
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path
