"""Evaluation after each stage: heldout.py (loss per domain), metrics.py (AA, AIA, FGT, BWT,
FWD), report.py (Markdown and plots)."""
