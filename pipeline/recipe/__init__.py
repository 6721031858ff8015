"""The recipe: typed dataclasses loaded from YAML (spec.py, with the generic loader in
typed_yaml.py), and the plan that turns it into tokens, steps and a mixture per stage (plan.py,
schedule.py). The lowest layer: it reads only the YAML file, never data, models or checkpoints."""
