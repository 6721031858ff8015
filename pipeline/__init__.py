"""Strata: continual pretraining of language models, stage by stage."""

__version__ = "0.1.0"
