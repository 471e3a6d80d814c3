"""``aa-compile sae train|fms|steer``: the concept-SAE claims run from the command line.

``train`` writes the base LM, the activation stores and a vanilla and a G-SAE of the same size to
``--out``; ``fms`` writes ``fms.json``, ``fms.md`` (the table of docs/sae.md) and ``fms.png``;
``steer`` writes ``steering.json`` and ``steering.png``. The lead wires `add_subcommand` into
``aa_compile/cli.py``; ``python -m aa_compile.sae.cli`` runs it on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from aa_compile.models.transformer import TransformerConfig
from aa_compile.threads import add_threads_argument, set_threads

from .base_lm import BASE_CONFIG
from .experiment import Settings, fms_table, prepare, steering_curve

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers such as '-1 0 1', got {text!r}"
                                         ) from None


def _train(args: argparse.Namespace) -> int:
    lm = dataclasses.replace(BASE_CONFIG, d_model=args.d_model, n_layers=args.n_layers,
                             d_ff=3 * args.d_model)
    s = Settings(lm_steps=args.lm_steps, lm_config=TransformerConfig(**dataclasses.asdict(lm)),
                 site=args.site, windows=args.windows, test_windows=args.test_windows,
                 seq_len=args.seq_len, latent_factor=args.latent_factor, k=args.k,
                 epochs=args.epochs, positive_scale=args.positive_scale, seed=args.seed)
    prepare(args.out, s)
    print(f"wrote {args.out}/lm.safetensors, store_train/, store_test/, sae_vanilla.safetensors, "
          "sae_gsae.safetensors")
    return 0


def _fms(args: argparse.Namespace) -> int:
    fms_table(args.out)
    with open(f"{args.out}/fms.md") as f:
        print(f.read(), end="")
    return 0


def _steer(args: argparse.Namespace) -> int:
    rows = steering_curve(args.out, args.alphas, args.scar_alphas, n_prompts=args.prompts,
                          new_tokens=args.new_tokens)
    for r in rows:
        print(f"{r['method']:>7} α={r['alpha']:+7.2f}  German share {r['german_share']:.2f}  "
              f"{r['bits_per_byte']:.3f} bits/byte")
    return 0


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``sae`` with its actions on an ``add_subparsers()`` object."""
    sae = subparsers.add_parser(
        "sae", formatter_class=FORMATTER, help="concept SAEs (SCAR, G-SAE): train, FMS, steer",
        description="Concept sparse autoencoders on a tiny local LM: train a vanilla SAE and a "
        "G-SAE, measure FMS and detection AUROC per concept, steer towards German.")
    actions = sae.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = actions.add_parser("train", formatter_class=FORMATTER,
                           help="base LM, activation stores, vanilla SAE and G-SAE",
                           description="Train (or reuse OUT/lm.safetensors) the base LM, store "
                           "its activations at --site, train both SAEs.")
    t.add_argument("--out", required=True, help="output folder (required)")
    t.add_argument("--lm-steps", type=int, default=300, help="base LM training steps")
    t.add_argument("--d-model", type=int, default=BASE_CONFIG.d_model, help="base LM width")
    t.add_argument("--n-layers", type=int, default=BASE_CONFIG.n_layers, help="base LM layers")
    t.add_argument("--site", default="block.2", help="where the SAE reads (block.<i>, mlp.<i>)")
    t.add_argument("--windows", type=int, default=512, help="train windows (half German)")
    t.add_argument("--test-windows", type=int, default=128, help="held-out windows")
    t.add_argument("--seq-len", type=int, default=64, help="bytes per window")
    t.add_argument("--latent-factor", type=int, default=4, help="latents = factor x width")
    t.add_argument("--k", type=int, default=16, help="TopK")
    t.add_argument("--epochs", type=int, default=10, help="SAE training epochs")
    t.add_argument("--positive-scale", type=float, default=5.0,
                   help="gradient scale of positive tokens in the concept loss")
    t.add_argument("--seed", type=int, default=0, help="seed of data, LM and SAEs")
    add_threads_argument(t)
    t.set_defaults(func=_train)
    f = actions.add_parser("fms", formatter_class=FORMATTER,
                           help="FMS@1/@5, held-out, shuffled, AUROC per concept",
                           description="The FMS table of a `sae train` folder.")
    f.add_argument("--out", required=True, help="folder written by `sae train` (required)")
    add_threads_argument(f)
    f.set_defaults(func=_fms)
    s = actions.add_parser("steer", formatter_class=FORMATTER,
                           help="German share and bits/byte vs α",
                           description="Steering curve of a `sae train` folder: G-SAE, "
                           "SCAR-style and difference-of-means steering towards German.")
    s.add_argument("--out", required=True, help="folder written by `sae train` (required)")
    s.add_argument("--alphas", type=_floats, default=(-1.0, -0.5, 0.0, 0.5, 1.0),
                   help="α of G-SAE and vector steering")
    s.add_argument("--scar-alphas", type=_floats, default=(-20.0, -5.0, 1.0, 5.0, 20.0),
                   help="latent scale of SCAR-style steering")
    s.add_argument("--prompts", type=int, default=16, help="English prompts")
    s.add_argument("--new-tokens", type=int, default=32, help="greedy bytes per prompt")
    add_threads_argument(s)
    s.set_defaults(func=_steer)
    return sae


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aa-compile", formatter_class=FORMATTER)
    add_subcommand(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    if hasattr(args, "threads"):
        set_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"aa-compile: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
