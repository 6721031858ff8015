"""`strata expand MODEL_DIR --add-layers K | --hidden-size H | --experts E --top-k K --out DIR`: grow a Hugging Face checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import StrataError
from pipeline.files import replace_dir, temp_dir_for

HELP = "grow a Hugging Face Llama, function-preserving (LLaMA Pro depth, width, or MoE upcycling)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir")
    parser.add_argument("--add-layers", type=int, help="LLaMA Pro: identity blocks to insert")
    parser.add_argument("--hidden-size", type=int, help="width: the new hidden size (a multiple of head_dim)")
    parser.add_argument("--intermediate-size", type=int, help="width: the new MLP width (default unchanged)")
    parser.add_argument("--noise", type=float, default=0.0, help="width: zero-sum jitter of split weights")
    parser.add_argument("--experts", type=int, help="MoE upcycling: every MLP becomes this many experts (a Mixtral)")
    parser.add_argument("--top-k", type=int, default=2, help="MoE: experts per token")
    parser.add_argument("--aux-loss-coef", type=float, default=None, help="MoE: router balance-loss weight (0.01)")
    parser.add_argument("--seed", type=int, default=0, help="width: seed of the new dimensions' reader weights; MoE: of the router")
    parser.add_argument("--out", required=True, help="folder to write")


_WEIGHT_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def run(args: argparse.Namespace) -> int:
    """`strata expand MODEL_DIR (--add-layers K | --hidden-size H2 [--intermediate-size I2]) --out DIR`."""
    import shutil
    from types import SimpleNamespace

    from pipeline.model.build import load_pretrained
    from pipeline.model.expand import apply_expansion

    src, out = Path(args.model_dir), Path(args.out)
    if sum(x is not None for x in (args.add_layers, args.hidden_size, args.experts)) != 1:
        raise StrataError("strata expand: give exactly one of --add-layers (LLaMA Pro), --hidden-size (width) "
                          "or --experts (MoE upcycling)")
    if out.resolve() == src.resolve():
        raise StrataError(f"strata expand: --out must differ from MODEL_DIR ({src})")
    model = load_pretrained(src)
    if model.config.model_type != "llama":
        raise StrataError(f"{src}: expansion supports Llama models, this is {model.config.model_type!r}")
    layers, total = model.config.num_hidden_layers, sum(p.numel() for p in model.parameters())
    method = "llama_pro" if args.add_layers is not None else "width" if args.hidden_size is not None else "moe"
    exp = SimpleNamespace(method=method, add_layers=args.add_layers, hidden_size=args.hidden_size,
                          intermediate_size=args.intermediate_size, noise=args.noise, experts=args.experts,
                          top_k=args.top_k, add_experts=None, aux_loss_coef=args.aux_loss_coef, freeze_old=False)
    model, positions = apply_expansion(model, exp, args.seed)
    tmp = temp_dir_for(out)
    model.save_pretrained(str(tmp))
    for f in src.iterdir():  # tokenizer files and anything else that is not the weights
        if f.is_file() and f.name not in _WEIGHT_FILES and f.suffix not in {".safetensors", ".bin", ".pt"}:
            shutil.copyfile(f, tmp / f.name)
    replace_dir(tmp, out)
    cfg = model.config
    where = f"; new blocks at {positions}" if positions else ""
    if method == "moe":
        where = f"; {cfg.num_local_experts} experts per MLP, top-{cfg.num_experts_per_tok} (Mixtral)"
    print(f"wrote {out}: {layers} -> {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, mlp "
          f"{cfg.intermediate_size}, {total:,} -> {sum(p.numel() for p in model.parameters()):,} parameters{where}")
    return 0



