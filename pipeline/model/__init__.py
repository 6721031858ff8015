"""Models: build.py (a Hugging Face causal LM from the recipe, loss), expand.py (growing a
model at a stage boundary), export.py (a Hugging Face folder per stage)."""
