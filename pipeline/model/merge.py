"""Merging two Hugging Face folders of one architecture with mergekit: linear, SLERP, TIES.

`w` is always the share of the *trained* model (the second folder), `earlier` the model it is
merged back towards:

    linear  (1 - w) * earlier + w * trained                      (mergekit linear, normalize off)
    slerp   spherical interpolation, t = w (t = 0: earlier)      (mergekit slerp, base = earlier)
    ties    earlier + w * TIES(trained - earlier), density 0.5   (mergekit ties, base = earlier)

mergekit (the `merge` extra) is imported only here and only when a merge runs. It takes local
folders by absolute path (a relative one would be looked up on the Hub) and never downloads. The
merged folder is written under a temporary name and renamed into place; the trained folder's
tokenizer files are copied beside the weights so the result loads like any stage export.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.errors import StrataError
from pipeline.files import replace_dir, temp_dir_for

METHODS = ("linear", "slerp", "ties")
TIES_DENSITY = 0.5  # share of each task vector's largest entries TIES keeps (mergekit's usual example)


def merge_config(earlier: Path, trained: Path, method: str, weight: float, dtype: str = "float32") -> dict:
    """mergekit's configuration for `method` with share `weight` of `trained`."""
    a, b = str(Path(earlier).resolve()), str(Path(trained).resolve())
    if method == "linear":
        models = [{"model": a, "parameters": {"weight": 1.0 - weight}}, {"model": b, "parameters": {"weight": weight}}]
        return {"merge_method": "linear", "models": models, "parameters": {"normalize": False}, "dtype": dtype}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                "parameters": {"t": weight}, "dtype": dtype}
    if method == "ties":
        return {"merge_method": "ties", "base_model": a, "dtype": dtype, "parameters": {"normalize": False},
                "models": [{"model": b, "parameters": {"weight": weight, "density": TIES_DENSITY}}]}
    raise StrataError(f"unknown merge method {method!r} (one of {', '.join(METHODS)})")


def merge_folders(earlier: Path, trained: Path, method: str, weight: float, out: Path,
                  dtype: str = "float32") -> Path:
    """Merge two Hugging Face folders into `out` (atomically), its weights in `dtype`; returns `out`."""
    for folder in (earlier, trained):
        if not (Path(folder) / "config.json").is_file():
            raise StrataError(f"{folder}: not a Hugging Face model folder (no config.json)")
    if not 0.0 <= weight <= 1.0:
        raise StrataError(f"merge weight must be between 0 and 1, got {weight}")
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    except ImportError:
        raise StrataError("merging needs mergekit: pip install 'strata-cpt[merge]'") from None
    config = MergeConfiguration.model_validate(merge_config(earlier, trained, method, weight, dtype))
    tmp = temp_dir_for(Path(out))
    try:
        run_merge(config, str(tmp), options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True))
    except (OSError, RuntimeError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StrataError(f"{out}: merging {earlier} and {trained} failed ({e})") from None
    for f in Path(trained).iterdir():  # the tokenizer and generation config of the trained model
        if f.is_file() and not (tmp / f.name).exists() and f.suffix not in (".safetensors", ".bin"):
            shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, Path(out))
    return Path(out)
