"""``aa-compile``: the command line.

    aa-compile info                 versions, devices, ops and their kernels, passes
    aa-compile report [options]     compile the reference transformer and print the report
    aa-compile explain [options]    AtMan explanation on the reference transformer (+ PNG)
    aa-compile fdtm sweep|plan|apply   DTM sensitivity sweep, compression plan, applied model
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
import warnings


def _info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import aa_compile
    from aa_compile.ops import OPS
    from aa_compile.passes.pipeline import PIPELINE

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    info = {
        "aa_compile": aa_compile.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "gpu": gpu,
        "backend": "aa (torch.compile(model, backend='aa'))",
        "ops": {name: entry.kernels for name, entry in OPS.items()},
        "passes": {p.name: p.description for p in PIPELINE},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("aa_compile", "python", "torch", "triton", "gpu", "backend"):
        print(f"{key:<11} {info[key]}")
    print("ops:")
    for name, kernels in info["ops"].items():
        print(f"  {name}")
        for device, module in kernels.items():
            print(f"    {device:<10} {module}")
    print("passes (pipeline order):")
    for name, description in info["passes"].items():
        print(f"  {name:<12} {description}")
    return 0


def _report(args: argparse.Namespace) -> int:
    import torch

    import aa_compile
    from aa_compile.models import Transformer, TransformerConfig

    cfg = TransformerConfig(
        vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers,
        n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, max_seq_len=max(args.seq_len, 16),
    )
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq_len))
    rep = aa_compile.report(model, ids, options={"inner_compiler": args.inner_compiler})
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep)
    return 0


class CheckpointError(ValueError):
    """A ``--checkpoint`` that cannot be used; ``main`` prints it as one line (exit code 2)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read checkpoint {path}: {reason}")


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _load_checkpoint(path: str):
    """``torch.load(path, weights_only=True)``, every failure as a :class:`CheckpointError`
    with a short reason: torch's own messages are long and advise ``weights_only=False``,
    which would run arbitrary code from an untrusted file."""
    import torch

    try:
        with warnings.catch_warnings():  # e.g. a pickle protocol note: not ours to print
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(path, e.strerror or _one_line(e)) from None
    except EOFError:
        raise CheckpointError(path, "the file is empty or truncated") from None
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if m:
            raise CheckpointError(
                path, f"it contains {m.group(1)}, which a weights-only load refuses (save "
                "tensors and plain containers: a state dict or {'config', 'state_dict'})"
            ) from None
        raise CheckpointError(path, "corrupt or not a torch.save file") from None
    except Exception as e:  # noqa: BLE001  (zip reader, unpickler internals: all "corrupt")
        detail = _one_line(e).split(". ")[0] if isinstance(e, RuntimeError) else ""
        raise CheckpointError(
            path, "corrupt or not a torch.save file" + (f" ({detail})" if detail else "")
        ) from None


def _checkpoint_model(path: str, defaults: dict | None = None):
    """The reference transformer of a checkpoint (``explain`` and ``fdtm``):
    ``{'config', 'state_dict'}`` or, where ``defaults`` (config fields) are given, also a bare
    state dict; content that does not fit is a :class:`CheckpointError` as well."""
    from aa_compile.models import Transformer, TransformerConfig

    ckpt = _load_checkpoint(path)
    fields = dict(defaults or {})
    if isinstance(ckpt, dict) and "state_dict" in ckpt and "config" in ckpt:
        config, state = ckpt["config"], ckpt["state_dict"]
        if not isinstance(config, dict):
            raise CheckpointError(path, f"'config' is a {type(config).__name__}, not a dict")
        fields.update(config)
    elif defaults is not None and isinstance(ckpt, dict):
        state = ckpt.get("state_dict", ckpt)
    else:
        raise CheckpointError(path, "expected a dict {'config': ..., 'state_dict': ...}"
                              + (" or a state dict" if defaults is not None else ""))
    try:
        model = Transformer(TransformerConfig(**fields))
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"bad config: {_one_line(e)}") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        detail = _one_line(e).removeprefix("Error(s) in loading state_dict for Transformer: ")
        raise CheckpointError(path, f"its weights do not fit the model: {detail}") from None
    return model


def _explain(args: argparse.Namespace) -> int:
    import torch

    from aa_compile.atman import explain
    from aa_compile.models import Transformer, TransformerConfig

    fields = {"vocab_size": args.vocab_size, "d_model": args.d_model, "n_layers": args.n_layers,
              "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "max_seq_len": args.max_seq_len}
    if args.checkpoint:
        model = _checkpoint_model(args.checkpoint, fields)
    else:
        model = Transformer(TransformerConfig(**fields))
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size

    def ids(text, n):
        if text:
            return [int(t) for t in text.replace(",", " ").split()]
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    prompt, target = ids(args.prompt, args.prompt_len), ids(args.target, args.target_len)
    exp = explain(model, prompt, target, factor=args.factor, mode=args.mode,
                  conceptual_threshold=args.conceptual_threshold, progress=not args.json)
    print(json.dumps(exp.to_dict(), indent=2) if args.json else exp)
    if args.png:
        exp.plot(args.png)
        print(f"heat-map written to {args.png}", file=sys.stderr)
    return 0


def _fdtm_model(args: argparse.Namespace):
    import torch

    if args.checkpoint:
        return _checkpoint_model(args.checkpoint).eval()
    from aa_compile.models import Transformer, TransformerConfig

    torch.manual_seed(args.seed)
    return Transformer(TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                                         max_seq_len=512)).eval()


def _fdtm(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from aa_compile import dtm

    model = _fdtm_model(args)
    prompts = dtm.byte_prompts(args.n_prompts, args.prompt_len, seed=args.seed)
    out = Path(args.out)
    if args.action == "sweep":
        out.mkdir(parents=True, exist_ok=True)
        res = dtm.sweep(model, prompts, args.n_tokens, args.levels.split(","),
                        reuse=not args.no_reuse, progress=True)
        (out / "sweep.json").write_text(json.dumps(res))
        dtm.heatmap(res, out / "sweep.png")
        print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
        return 0
    if args.action == "plan" and args.budget is not None:
        # FDTM plan at a fixed budget (no sweep needed), beside uniform pruning at that sparsity
        planner = dtm.refine_plan if args.budget_method == "refine" else dtm.budget_plan
        ref = dtm.generate(model, prompts, args.n_tokens)  # the base continuations, once for both
        res = planner(model, prompts, args.n_tokens, args.budget, reference=ref, progress=True)
        uniform = dtm.apply(model, {c: f"prune:{args.budget}" for c in dtm.find_components(model)})
        res["uniform"] = dtm.dtm(model, uniform, prompts, args.n_tokens, reference=ref).summary()
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"plan: {len(res['plan'])} components, {res['share_saved']:.1%} of component bytes "
              f"pruned in {res['rounds']} rounds; fdt_median={res['measured']['fdt_median']:.1f} "
              f"(uniform prune:{args.budget}: {res['uniform']['fdt_median']:.1f}), fdt_mean="
              f"{res['measured']['fdt_mean']:.1f} ({res['uniform']['fdt_mean']:.1f}); wrote "
              f"{args.out}")
        return 0
    if not args.input:
        raise ValueError(f"fdtm {args.action} needs --input (a sweep JSON for plan, a plan JSON "
                         "for apply)")
    data = json.loads(Path(args.input).read_text())
    if args.action == "plan":
        if data.get("n_prompts") != args.n_prompts or data.get("prompt_len") != args.prompt_len:
            print("note: measuring on other prompts than the sweep's", file=sys.stderr)
        res = dtm.plan(model, data, prompts, args.tau, args.statistic, progress=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        m = res["measured"]
        print(f"plan: {len(res['plan'])} components, {res['share_saved']:.1%} of component bytes "
              f"saved; measured {args.statistic}={m[args.statistic]:.1f} (tau={args.tau}); "
              f"wrote {args.out}")
        return 0
    small = dtm.apply(model, data.get("plan", data))
    r = dtm.dtm(model, small, prompts, args.n_tokens).summary()
    torch.save(small, args.out)
    print(json.dumps(r, indent=2))
    print(f"wrote the compressed module (torch.save pickle) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aa-compile",
        description="aa-compile: torch.compile backend, FX passes and aa:: kernels.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, devices, registered ops and passes")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)

    report = sub.add_parser(
        "report", help="compile the reference transformer with backend='aa' and print the report"
    )
    _model_arguments(report, d_model=256, vocab_size=1024)
    report.add_argument("--seq-len", type=int, default=32)
    report.add_argument(
        "--inner-compiler", default="eager", choices=["inductor", "eager", "aot_eager"],
        help="what compiles the graph after the passes (default: eager, quick)",
    )
    report.add_argument("--json", action="store_true", help="print JSON")
    report.set_defaults(func=_report)

    ex = sub.add_parser(
        "explain", help="AtMan explanation of a target continuation on the reference transformer"
    )
    ex.add_argument("--checkpoint", help="torch.save'd state dict, or {'config', 'state_dict'}")
    ex.add_argument("--prompt", help="prompt token ids ('1 2 3'); default: random")
    ex.add_argument("--target", help="target token ids; default: random")
    ex.add_argument("--prompt-len", type=int, default=16)
    ex.add_argument("--target-len", type=int, default=4)
    ex.add_argument("--mode", default="log_additive", choices=["log_additive", "multiplicative"])
    ex.add_argument("--factor", type=float, default=0.1)
    ex.add_argument("--conceptual-threshold", type=float, default=None)
    _model_arguments(ex, d_model=64, vocab_size=256)
    ex.add_argument("--max-seq-len", type=int, default=512)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--png", help="write the heat-map PNG here")
    ex.add_argument("--json", action="store_true", help="print JSON")
    ex.set_defaults(func=_explain)
    fd = sub.add_parser(
        "fdtm", help="Divergent Token Metrics: per-component sweep, plan, apply (pruning/int8)"
    )
    fd.add_argument("action", choices=["sweep", "plan", "apply"])
    fd.add_argument("--checkpoint", help="{'config', 'state_dict'} of a reference transformer "
                    "(bench/train_reference.py); default: a random byte-level one")
    fd.add_argument("--input", help="plan: the sweep JSON; apply: the plan JSON")
    fd.add_argument("--out", default="fdtm_out", help="sweep: folder; plan: JSON; apply: .pt")
    fd.add_argument("--n-prompts", type=int, default=32)
    fd.add_argument("--prompt-len", type=int, default=32)
    fd.add_argument("--n-tokens", type=int, default=64)
    fd.add_argument("--levels", default="prune:0.25,prune:0.5,prune:0.75,prune:0.9,2:4,int8")
    fd.add_argument("--tau", type=float, default=32.0)
    fd.add_argument("--budget", type=float, default=None, metavar="SHARE",
                    help="plan: prune this share of the component weights (0-1) with an FDTM "
                    "plan (--budget-method; no --input needed) instead of the --tau "
                    "constraint on a sweep; also measures uniform pruning at that sparsity")
    fd.add_argument("--budget-method", choices=["refine", "rounds"], default="refine",
                    help="with --budget: 'refine' (default; exchanges of pruned weights between "
                    "components starting from uniform pruning, aa_compile.dtm.refine) or "
                    "'rounds' (the paper's rounds from the dense model, aa_compile.dtm.rounds)")
    fd.add_argument("--statistic", default="fdt_median")
    fd.add_argument("--no-reuse", action="store_true", help="recompute every run from scratch")
    fd.add_argument("--seed", type=int, default=0)
    fd.set_defaults(func=_fdtm)
    return parser


def _model_arguments(parser: argparse.ArgumentParser, *, d_model: int, vocab_size: int) -> None:
    """The reference transformer's size options, shared by the subcommands that build one."""
    parser.add_argument("--d-model", type=int, default=d_model)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--n-kv-heads", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=vocab_size)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"aa-compile: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
