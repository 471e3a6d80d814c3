"""``aa-compile export onnx``: write a saved model (or a random reference transformer) as an
ONNX file through `aa_compile.export.onnx` and print the report. `add_subcommand` registers
``export`` on the main parser's subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from aa_compile.cli_format import HelpFormatter
from aa_compile.threads import add_threads_argument, set_threads

#: the example text of the byte- and word-level models (its words and bytes set the shapes)
EXAMPLE_TEXT = "The quick brown fox jumps over the lazy dog"


def add_subcommand(subparsers: Any) -> None:
    """Register ``export`` (with the action ``onnx``) on ``subparsers``."""
    formatter = HelpFormatter
    export = subparsers.add_parser(
        "export", help="export a model rewritten by the aa passes (ONNX)",
        description="Export a model rewritten by the aa passes.", formatter_class=formatter)
    actions = export.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "onnx", formatter_class=formatter,
        help="write an ONNX file, check it with onnx.checker and onnxruntime against eager",
        description="Write a saved model (any kind: transformer, umup, tfree, hat, or an "
        "fdtm apply --out directory) or a random reference transformer as an ONNX file; "
        "check it with onnx.checker and onnxruntime against eager PyTorch; print which aa:: "
        "ops were translated how.")
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="saved model directory (default: a random reference transformer of "
                   "--d-model/--layers/--vocab-size)")
    p.add_argument("--out", required=True, metavar="PATH", help="the .onnx file to write "
                   "(required, no default)")
    p.add_argument("--batch", type=int, default=2, help="example batch size (token models)")
    p.add_argument("--seq-len", type=int, default=16, help="example sequence length (token "
                   "models)")
    p.add_argument("--static", action="store_true",
                   help="fixed shapes (default: off: dynamic batch and sequence for token models "
                   "and T-FREE (with its trigram count), every ByteBatch size for HAT)")
    p.add_argument("--d-model", type=int, default=64, help="random model: width")
    p.add_argument("--layers", type=int, default=2, help="random model: layers")
    p.add_argument("--vocab-size", type=int, default=256, help="random model: vocabulary")
    p.add_argument("--options", default="{}", metavar="JSON",
                   help="aa backend options as JSON, e.g. '{\"disable\": [\"rms_norm\"]}'")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="largest accepted max|onnxruntime - eager| / max|eager| per output")
    p.add_argument("--runtime", choices=("onnxruntime", "standard"), default="onnxruntime",
                   help="onnxruntime: its contrib operators where faster (int8 linears as "
                   "MatMulNBits with int8 activations, checked by SQNR); standard: standard ONNX "
                   "operators only, for any runtime")
    p.add_argument("--json", action="store_true", help="print the report as JSON (default: text)")
    add_threads_argument(p)
    p.set_defaults(func=run_onnx)


def run_onnx(args: argparse.Namespace) -> int:
    from aa_compile.export.onnx_export import onnx

    set_threads(args.threads)
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as e:
        raise ValueError(f"--options must be a JSON object, got {args.options!r}: {e}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object, got {args.options!r}")
    for name in ("batch", "seq_len"):
        if getattr(args, name) < 2 and not args.static:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 2 for a dynamic dimension "
                             "(torch fixes sizes 0 and 1), or pass --static")
    model, inputs, dynamic = _model_and_inputs(args)
    report = onnx(model, inputs, args.out, dynamic_shapes=None if args.static else dynamic,
                  options=options, rtol=args.rtol, runtime=args.runtime)
    if args.json:
        print(json.dumps({**report.__dict__, "ops": {k: list(v) for k, v in report.ops.items()}},
                         indent=2))
    else:
        print(report)
    return 0


def _model_and_inputs(args: argparse.Namespace):
    """``(module, example inputs, dynamic shapes)`` for the checkpoint's kind."""
    from aa_compile.export.wrappers import HATBytes, TFreeWords

    g = torch.Generator().manual_seed(0)
    if args.checkpoint is None:
        from aa_compile.models import Transformer, TransformerConfig

        torch.manual_seed(0)
        cfg = TransformerConfig(vocab_size=args.vocab_size, d_model=args.d_model,
                                n_layers=args.layers, n_heads=max(1, args.d_model // 32),
                                max_seq_len=max(64, args.seq_len))
        model, vocab, kind = Transformer(cfg).eval(), args.vocab_size, "transformer"
    else:
        if not Path(args.checkpoint).is_dir():
            raise ValueError(f"--checkpoint {args.checkpoint} is not a saved model directory")
        from aa_compile import dtm
        from aa_compile.models import checkpoint

        meta = checkpoint.read_config(args.checkpoint)
        kind = meta["kind"]
        model = (dtm.load_applied(args.checkpoint) if "dtm" in meta
                 else checkpoint.load_model(args.checkpoint))
        vocab = meta["config"].get("vocab_size", 256)
        if kind == "tfree":
            tokenizer = checkpoint.load_tokenizer(args.checkpoint)
            words = EXAMPLE_TEXT.split()[:4]
            wrapped = TFreeWords(model)
            inputs = TFreeWords.example(tokenizer, [words, words[::-1]])
            return wrapped, inputs, wrapped.dynamic_shapes()
        if kind == "hat":
            texts = [EXAMPLE_TEXT, EXAMPLE_TEXT.upper()]  # two documents: every size >= 2
            return HATBytes(model), HATBytes.example(model, texts), HATBytes.dynamic_shapes()
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g)
    return model, (ids,), ({0: "batch", 1: "seq"},)
