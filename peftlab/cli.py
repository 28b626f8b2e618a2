"""``python -m peftlab``: command-line tools.

    python -m peftlab merge --adapters A_DIR B_DIR --weights 1 0.5 --method ties --density 0.5 --out MERGED
    python -m peftlab merge-models --models ft1.safetensors ft2.safetensors --base base.safetensors \\
        --method ties --density 0.2 --lambda 1.0 --out merged.safetensors

Explained in: book/merging_adapters.ipynb
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

MERGE_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
               "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
MODEL_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m peftlab`` (one sub-command per tool).

    Explained in: book/merging_adapters.ipynb
    """
    parser = argparse.ArgumentParser(
        prog="python -m peftlab",
        description="peftlab command-line tools: merge LoRA adapters or full-model checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    m = sub.add_parser(
        "merge", help="merge LoRA adapter folders (peft or peftlab) into a new adapter folder",
        description="Merge LoRA adapter folders into one peft-format adapter, as add_weighted_adapter does, "
                    "working on the adapter files alone (no base model needed).",
    )
    m.add_argument("--adapters", nargs="+", required=True, metavar="DIR", help="adapter folders to merge")
    m.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per adapter (negative subtracts); default 1 each")
    m.add_argument("--method", required=True, choices=MERGE_TYPES, metavar="METHOD",
                   help="combination type: " + ", ".join(MERGE_TYPES))
    m.add_argument("--density", type=float, help="fraction kept by ties/dare/magnitude_prune types, in (0, 1]")
    m.add_argument("--svd-rank", type=int, help="rank of the merged adapter for svd types (default: largest rank)")
    m.add_argument("--svd-clamp", type=float, help="quantile for clamping the svd factors (default: none)")
    m.add_argument("--majority-sign", choices=("total", "frequency"), default="total",
                   help="how ties/dare_ties elect the sign per entry (default: total)")
    m.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (per module; default 0)")
    m.add_argument("--allow-different-targets", action="store_true",
                   help="merge adapters that adapt different modules (over the union of modules)")
    m.add_argument("--out", required=True, metavar="DIR", help="folder for the merged adapter")
    m.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")

    mm = sub.add_parser(
        "merge-models", help="merge full-model safetensors checkpoints through their task vectors",
        description="θ = θ_base + λ · merge(θ_1 − θ_base, …; weights) for safetensors checkpoints "
                    "(a file, or a folder with model.safetensors or shards).",
    )
    mm.add_argument("--models", nargs="+", required=True, metavar="PATH", help="fine-tuned checkpoints")
    mm.add_argument("--base", required=True, metavar="PATH", help="the pretrained checkpoint they started from")
    mm.add_argument("--method", required=True, choices=MODEL_METHODS, metavar="METHOD",
                    help="merge method: " + ", ".join(MODEL_METHODS))
    mm.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per model; default 1 each")
    mm.add_argument("--density", type=float, help="fraction kept by ties/dare/magnitude_prune, in (0, 1]")
    mm.add_argument("--lambda", dest="scaling", type=float, default=1.0,
                    help="scaling λ of the merged task vector (default 1)")
    mm.add_argument("--majority-sign", choices=("total", "frequency"), default="total",
                    help="how ties/dare_ties elect the sign per entry (default: total)")
    mm.add_argument("--scope", choices=("tensor", "model"), default="tensor",
                    help="trim each tensor on its own (default, as peft) or the whole model at once (TIES paper)")
    mm.add_argument("--exclude", nargs="*", default=[], metavar="REGEX",
                    help="keys that keep the base value (e.g. task heads)")
    mm.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (per tensor; default 0)")
    mm.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    mm.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m peftlab``; returns the exit status (0 ok, 1 a merge error, 2 bad arguments).

    Explained in: book/merging_adapters.ipynb
    """
    args = build_parser().parse_args(argv)
    from peftlab.merging.files import merge_adapter_folders, merge_checkpoints

    try:
        if args.command == "merge":
            out = merge_adapter_folders(
                args.adapters, args.weights, args.out, combination_type=args.method, density=args.density,
                svd_rank=args.svd_rank, majority_sign_method=args.majority_sign, svd_clamp=args.svd_clamp,
                seed=args.seed, force=args.force, allow_different_targets=args.allow_different_targets)
            print(f"merged {len(args.adapters)} adapters ({args.method}) into {out}")
        else:
            out = merge_checkpoints(
                args.models, args.base, args.out, method=args.method, weights=args.weights, density=args.density,
                scaling=args.scaling, majority_sign_method=args.majority_sign, seed=args.seed, scope=args.scope,
                exclude=args.exclude, force=args.force)
            print(f"merged {len(args.models)} models ({args.method}) into {out}")
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"python -m peftlab {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
