"""Per-stage learning-rate schedules: warmup from min_lr to max_lr, then a decay shape to min_lr.

Each stage owns its schedule, so the LR re-warms at every stage boundary (continual pretraining
needs the re-warm to adapt to the new distribution; see "Simple and Scalable Strategies to
Continually Pre-train LLMs", Ibrahim et al. 2024). The schedule is a pure function of the step
index within the stage, so resuming needs no scheduler state: the step counter is enough.

Step convention: `lr(step)` is the rate used by the optimizer step with 0-based index `step`.
The last warmup step trains at exactly max_lr and the last step of the stage at exactly min_lr
(except `constant`, which stays at max_lr after warmup).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.recipe.spec import Schedule


def warmup_steps(schedule: Schedule, steps: int) -> int:
    """Warmup length in steps: a fraction of the stage if < 1, else a count."""
    warm = round(schedule.warmup * steps) if schedule.warmup < 1 else int(schedule.warmup)
    return min(warm, steps)


@dataclass(frozen=True)
class StageSchedule:
    steps: int
    warmup: int
    max_lr: float
    min_lr: float
    decay: str  # cosine | linear | constant | wsd
    decay_fraction: float = 0.2

    @classmethod
    def from_recipe(cls, schedule: Schedule, steps: int) -> StageSchedule:
        return cls(steps, warmup_steps(schedule, steps), schedule.max_lr, schedule.min_lr,
                   schedule.decay, schedule.decay_fraction)

    def lr(self, step: int) -> float:
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} outside the stage's 0..{self.steps - 1}")
        span = self.max_lr - self.min_lr
        if step < self.warmup:
            return self.min_lr + span * (step + 1) / self.warmup
        if self.decay == "constant":
            return self.max_lr
        if self.decay == "wsd":
            # Warmup-stable-decay: hold max_lr, then decay linearly over the final share of the
            # stage. The decay never starts before warmup ends.
            decay_steps = max(1, round(self.decay_fraction * self.steps))
            start = max(self.warmup, self.steps - decay_steps)
            if step < start:
                return self.max_lr
            return self.max_lr - span * (step - start + 1) / (self.steps - start)
        # Progress through the decay phase, reaching 1.0 on the stage's last step.
        progress = (step - self.warmup + 1) / (self.steps - self.warmup)
        if self.decay == "linear":
            return self.max_lr - span * progress
        if self.decay == "cosine":
            return self.min_lr + span * 0.5 * (1 + math.cos(math.pi * progress))
        raise ValueError(f"unknown decay {self.decay!r}")
