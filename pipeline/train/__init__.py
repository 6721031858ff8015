"""Training: trainer.py (the stage loop on DeepSpeed) with checkpoint.py (atomic checkpoints and
the pointer), run_folder.py (run.json and the stage folders), failures.py (signals, NaN guard),
sinks.py (TensorBoard, W&B), and token selection: reference.py (the frozen reference model),
selection.py (RHO-1 in the step), scoring.py (precomputed reference losses)."""
