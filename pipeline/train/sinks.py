"""Logging sinks beside metrics.jsonl: TensorBoard and Weights & Biases, each only when asked.

metrics.jsonl is always written (it is what `strata report` reads). `train.tensorboard` and
`train.wandb` add the same scalars, keyed by the global step (steps of all earlier stages plus the
step in the stage). Both libraries are imported only when the recipe asks for them, so neither is
a dependency. W&B follows its own environment: WANDB_MODE=offline (or disabled) is respected,
WANDB_PROJECT names the project (default "strata"), and the run id is kept in RUN_DIR so a resumed
run continues the same W&B run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import StrataError
from pipeline.recipe.spec import Recipe

WANDB_ID = "wandb-id.txt"


def check_sinks(recipe: Recipe) -> None:
    """Refuse a sink the recipe asks for but cannot import. Every rank calls this before the first
    collective, so that no rank is left waiting for one that stopped on the error."""
    import importlib.util

    if recipe.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise StrataError("train.tensorboard is set but tensorboard is not installed (pip install tensorboard)")
    if recipe.train.wandb and importlib.util.find_spec("wandb") is None:
        raise StrataError("train.wandb is set but wandb is not installed (pip install wandb)")


def open_wandb(recipe: Recipe, run_dir: Path) -> Any:
    """A W&B run when the recipe sets train.wandb, else None (rank 0 only)."""
    if not recipe.train.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise StrataError("train.wandb is set but wandb is not installed (pip install wandb)") from None
    run_dir = Path(run_dir)
    id_file = run_dir / WANDB_ID
    if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:16] + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "strata"), name=f"{recipe.name}:{run_dir.name}",
                      id=id_file.read_text().strip(), resume="allow", dir=str(run_dir), config=recipe.raw)


def log_scalars(tb: Any, wandb_run: Any, scalars: dict[str, float | None], step: int) -> None:
    """The same scalars to TensorBoard and W&B (either may be None)."""
    scalars = {k: v for k, v in scalars.items() if v is not None}
    if tb is not None:
        for key, value in scalars.items():
            tb.add_scalar(key, value, step)
    if wandb_run is not None:
        wandb_run.log(scalars, step=step)
