"""``aa-compile``: the command line.

    aa-compile info                 versions, devices, ops and their kernels, passes
    aa-compile report [options]     compile the reference transformer and print the report
    aa-compile generate [options]   continue a text with a saved model (any kind)
    aa-compile explain [options]    AtMan explanation on the reference transformer (+ PNG)
    aa-compile fdtm sweep|plan|apply   DTM sensitivity sweep, compression plan, applied model
    aa-compile export onnx [options]   ONNX file of a saved model, checked in onnxruntime
    aa-compile sae train|fms|steer     concept SAEs (SCAR, G-SAE): train, FMS, steering
    aa-compile mad run|report          MAD synthetic capability suite: train, score, plot

``--checkpoint`` takes a saved model directory (``--out`` of every training CLI,
`aa_compile.models.save_model`) or, for ``explain`` and ``fdtm``, the older torch file
``{'config', 'state_dict'}``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from aa_compile.distributed import is_writer, torchrun_group
from aa_compile.export.cli import add_subcommand as add_export_subcommand
from aa_compile.mad.cli import add_subcommand as add_mad_subcommand
from aa_compile.sae.cli import add_subcommand as add_sae_subcommand
from aa_compile.cli_format import HelpFormatter
from aa_compile.threads import add_threads_argument, set_threads


def _info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import aa_compile
    from aa_compile.export.translations import translation_kinds
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
        "onnx": translation_kinds(),
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
        print(f"    {'onnx':<10} {info['onnx'].get(name, 'none (no register_onnx)')}")
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


def _saved_model(directory: str):
    """``(model, tokenizer, config.json)`` of a saved model directory; a DTM-compressed one
    (``fdtm apply --out``) through `aa_compile.dtm.load_applied`; a released HAT model (Hugging
    Face layout) through `HATModel.from_pretrained`; a released T-FREE model (the public
    trigrams repository's ``transformer/`` + ``tokenizer/`` folder) through
    `TFreeLM.from_pretrained` (its dictionary words under the key ``"words"``)."""
    from aa_compile import dtm
    from aa_compile.models import checkpoint
    from aa_compile.models.hat import HATModel
    from aa_compile.models.hat.pretrained import MODEL_TYPE, HATCheckpointWarning
    from aa_compile.models.tfree import TFreeLM
    from aa_compile.models.tfree.pretrained import is_released_tfree

    if is_released_tfree(directory):  # a released T-FREE model
        model = TFreeLM.from_pretrained(directory)
        return model, model.tokenizer, {"kind": "tfree", "released": True,
                                        "words": model.released.words}
    raw = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")) \
        if (Path(directory) / "config.json").is_file() else None
    if isinstance(raw, dict) and raw.get("model_type") == MODEL_TYPE:  # a released HAT model
        with warnings.catch_warnings():
            warnings.simplefilter("always", HATCheckpointWarning)
            return HATModel.from_pretrained(directory), None, {"kind": "hat", "released": True}
    meta = checkpoint.read_config(directory)
    model = dtm.load_applied(directory) if "dtm" in meta else checkpoint.load_model(directory)
    return model, checkpoint.load_tokenizer(directory), meta


#: saved kinds whose forward takes token ids (what explain and fdtm feed)
TOKEN_KINDS = ("transformer", "umup")


def _any_checkpoint(path: str, defaults: dict | None = None, command: str = "explain"):
    """``(model, tokenizer or None)`` of a token-level model: a saved model directory, else
    the older torch file."""
    if Path(path).is_dir():
        model, tokenizer, meta = _saved_model(path)
        if meta["kind"] not in TOKEN_KINDS:
            raise ValueError(f"{command} takes a model of token ids ({', '.join(TOKEN_KINDS)});"
                             f" {path} holds a {meta['kind']} model")
        return model, tokenizer
    return _checkpoint_model(path, defaults), None


def _text_tokenizer(name: str | None, saved: Any):
    """``--tokenizer``: ``bytes``, a local Hugging Face tokenizer, else the checkpoint's, else
    UTF-8 bytes."""
    from aa_compile.models import ByteTokenizer

    if name is None:
        return saved if saved is not None else ByteTokenizer()
    if name == "bytes":
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"--tokenizer {name}: a Hugging Face tokenizer needs the transformers "
                         "package") from None
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer {name}: no such local Hugging Face tokenizer "
                         f"({_one_line(e, 160)})") from None


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise ValueError(f"{type(tokenizer).__name__} does not turn text into token ids "
                         "(explain needs a token-level model: transformer or umup)")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _token_ids(text: str, option: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{option} takes token ids such as '1 2 3', got {text!r} (text goes "
                         f"to {option.removesuffix('-ids')})") from None


def _explain(args: argparse.Namespace) -> int:
    import torch

    from aa_compile.atman import explain
    from aa_compile.models import Transformer, TransformerConfig

    fields = {"vocab_size": args.vocab_size, "d_model": args.d_model, "n_layers": args.n_layers,
              "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "max_seq_len": args.max_seq_len}
    saved = None
    if args.checkpoint:
        model, saved = _any_checkpoint(args.checkpoint, fields)
    else:
        torch.manual_seed(args.seed)  # the same random model for the same --seed
        model = Transformer(TransformerConfig(**fields))
    if args.prompt is not None and args.prompt_ids is not None:
        raise ValueError("give the prompt as --prompt (text) or --prompt-ids, not both")
    if args.target is not None and args.target_ids is not None:
        raise ValueError("give the target as --target (text) or --target-ids, not both")
    texts = args.prompt is not None or args.target is not None
    tokenizer = _text_tokenizer(args.tokenizer, saved) if texts or args.tokenizer else None
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size

    def ids(text, id_text, option, n):
        if text is not None:
            return _encode(tokenizer, text)
        if id_text is not None:
            return _token_ids(id_text, option)
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    prompt = ids(args.prompt, args.prompt_ids, "--prompt-ids", args.prompt_len)
    target = ids(args.target, args.target_ids, "--target-ids", args.target_len)
    with torchrun_group() as group:  # under torchrun the ranks share the perturbations
        exp = explain(model, prompt, target, factor=args.factor, mode=args.mode,
                      conceptual_threshold=args.conceptual_threshold, progress=not args.json,
                      tokenizer=tokenizer, group=group)
        writer = is_writer(group)
    if not writer:
        return 0
    print(json.dumps(exp.to_dict(), indent=2) if args.json else exp)
    if args.png:
        exp.plot(args.png)
        print(f"heat-map written to {args.png}", file=sys.stderr)
    return 0


#: the prompt ``generate`` continues when none is given
DEFAULT_PROMPT = "Once upon a time"
#: what ``generate`` counts for its throughput figure, per model kind
GENERATED_UNIT = {"tfree": "words", "hat": "bytes"}


def generate_counted(model, tokenizer: Any, kind: str, prompt: str, max_new: int,
                     words: list[str] | None = None) -> tuple[str, int]:
    """The prompt and its greedy continuation by a saved model of ``kind`` (``max_new`` words
    for T-FREE, picked from ``words`` and the prompt's; bytes for HAT; tokens for transformer
    and u-μP), and how many words / bytes / tokens were generated."""
    import torch

    if max_new < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new}")
    if kind == "tfree":
        if tokenizer is None:
            raise ValueError("this T-FREE checkpoint has no tokenizer saved with it")
        out = model.generate(tokenizer, prompt, max_new, words=words or ())
        return tokenizer.decode(tokenizer.words(prompt) + out), len(out)
    if kind == "hat":
        data, _ = model.generate_bytes(prompt, max_bytes=max_new)
        return prompt + model.splitter.decode(data), len(data)
    ids = _encode(tokenizer, prompt)
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([ids], dtype=torch.int64, device=device),
                         max_new)[0].tolist()
    return tokenizer.decode(out), len(out) - len(ids)


def generate_text(model, tokenizer: Any, kind: str, prompt: str, max_new: int,
                  words: list[str] | None = None) -> str:
    """The prompt and its greedy continuation (see `generate_counted`)."""
    return generate_counted(model, tokenizer, kind, prompt, max_new, words)[0]


def compile_for_generation(model, kind: str, options: dict) -> None:
    """Compile, in place with ``backend="aa"``, the modules the cached generation of ``kind``
    calls: the whole forward of T-FREE and the transformer (one graph for the prefill, one for
    the steps: ``dynamic=True``); for HAT the word pooling, the backbone blocks and the byte
    stacks' norms and MLPs (its cached decoding calls these pieces, not the forward). u-μP
    compiles per length (``dynamic=None``): its attention scale is Python float math on the
    sequence length, and with ``dynamic=True`` dynamo 2.13 builds a float guard that fails on
    the frame that made it."""
    if kind != "hat":
        model.compile(backend="aa", options=options, dynamic=None if kind == "umup" else True)
        return
    parts = [model.pooling, *model.backbone, model.decoder.norm]
    for layer in [*model.encoder.layers, *model.decoder.layers]:
        parts += [layer.attn_norm, layer.mlp_norm, layer.mlp]
    for part in parts:
        part.compile(backend="aa", options=options, dynamic=True)


def _generation_words(args: argparse.Namespace, meta: dict) -> list[str] | None:
    """T-FREE's dictionary: the checkpoint's words (``--max-words`` first ones) and the
    ``--words`` file's."""
    from aa_compile.models import load_words

    words = list(meta["words"]) if meta.get("released") else \
        list(load_words(args.checkpoint) or [])
    if args.max_words is not None:
        words = words[:args.max_words]
    if args.words:
        try:
            extra = Path(args.words).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--words {args.words}: {_one_line(e)}") from None
        words += [w for w in extra if w]
    return words


def _generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from aa_compile.config import Config
    from aa_compile.models import ByteTokenizer

    if args.prompt is not None and args.text is not None:
        raise ValueError("give the prompt as the PROMPT argument or --prompt, not both")
    prompt = args.text if args.text is not None else (
        args.prompt if args.prompt is not None else DEFAULT_PROMPT)
    if not Path(args.checkpoint).is_dir():
        raise ValueError(f"cannot load {args.checkpoint}: generate takes a saved model "
                         "directory (the --out of a training CLI, or a released HAT or T-FREE "
                         "folder)")
    if args.max_words is not None and args.max_words < 0:
        raise ValueError(f"--max-words must be >= 0, got {args.max_words}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, meta = _saved_model(args.checkpoint)
    kind = meta["kind"]
    if kind != "tfree":
        tokenizer = _text_tokenizer(args.tokenizer, tokenizer)
        if args.words or args.max_words is not None:
            raise ValueError("--words and --max-words apply to T-FREE models only")
    elif args.tokenizer is not None:
        raise ValueError("--tokenizer does not apply to T-FREE (it has its trigram tokenizer)")
    words = _generation_words(args, meta) if kind == "tfree" else None
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, None: None}[args.dtype]
    model = model.to(device=device, dtype=dtype).eval()
    inner = args.inner_compiler or ("inductor" if device.startswith("cuda") else "eager")
    if args.backend == "aa":
        compile_for_generation(model, kind, Config.from_options(
            {"inner_compiler": inner}).__dict__)
        # the same run first, so that the figure below leaves out the compiles (a greedy
        # generation repeats itself, so the second run meets no new shape)
        generate_counted(model, tokenizer or ByteTokenizer(), kind, prompt,
                         args.max_new_tokens, words)
    start = time.perf_counter()
    text, n = generate_counted(model, tokenizer or ByteTokenizer(), kind, prompt,
                               args.max_new_tokens, words)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(text)
    unit = GENERATED_UNIT.get(kind, "tokens")
    how = f"backend aa, inner compiler {inner}" if args.backend == "aa" else "eager"
    decoding = "no KV cache: the window is re-run each step" if kind == "umup" else "cached decoding"
    print(f"generated {n} {unit} in {seconds:.3f} s: {n / max(seconds, 1e-9):.1f} {unit}/s "
          f"({kind}, {device}, {how}, {decoding})", file=sys.stderr)
    return 0


FDTM_DEFAULTS = {"n_prompts": 32, "prompt_len": 32, "n_tokens": 64, "seed": 0,
                 "checkpoint": None}
#: the fdtm settings that plan and apply take from their --input (CLI option names)
FDTM_SETTINGS = ("n_tokens", "n_prompts", "prompt_len", "seed", "checkpoint")


def _fdtm_model(checkpoint: str | None, seed: int):
    """``(model, tokenizer)``: a checkpoint, else a random byte-level transformer."""
    import torch

    if checkpoint:
        model, tokenizer = _any_checkpoint(checkpoint, command="fdtm")
        return model.eval(), tokenizer
    from aa_compile.models import Transformer, TransformerConfig

    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                                         max_seq_len=512)).eval(), None


def _fdtm_settings(args: argparse.Namespace, recorded: dict, source: str | None) -> dict:
    """The run's settings: the command line's, else ``recorded`` (from the --input file
    ``source``), else the defaults; with a ``source``, prints one line saying which came from
    where."""
    settings, origin = {}, {}
    for key in FDTM_SETTINGS:
        given = getattr(args, key)
        if given is not None:
            settings[key], origin[key] = given, "command line"
        elif key in recorded:
            settings[key], origin[key] = recorded[key], source
        else:
            settings[key], origin[key] = FDTM_DEFAULTS[key], "default"
    if source is None:
        return settings
    groups: dict[str, list[str]] = {}
    for key in FDTM_SETTINGS:
        groups.setdefault(origin[key], []).append(f"{key}={settings[key]}")
    print(f"fdtm {args.action}: " + "; ".join(f"{', '.join(v)} from {k}"
                                              for k, v in groups.items()), file=sys.stderr)
    return settings


def _fdtm_sweep(args: argparse.Namespace) -> int:
    from aa_compile import dtm

    settings = _fdtm_settings(args, {}, None)
    model, _ = _fdtm_model(settings["checkpoint"], settings["seed"])
    prompts = dtm.byte_prompts(settings["n_prompts"], settings["prompt_len"],
                               seed=settings["seed"])
    out = Path(args.out)
    with torchrun_group() as group:  # under torchrun the ranks share the components
        res = dtm.sweep(model, prompts, settings["n_tokens"], args.levels.split(","),
                        reuse=not args.no_reuse, progress=True, group=group)
        writer = is_writer(group)
    if not writer:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    res.update(seed=settings["seed"], checkpoint=settings["checkpoint"])
    (out / "sweep.json").write_text(json.dumps(res))
    dtm.heatmap(res, out / "sweep.png")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return 0


def default_tau(n_tokens: int) -> float:
    """τ when none is given: half the generated tokens, so that a constraint on the median
    FDT can be met at the sweep's N (N=64 gives the former default, 32)."""
    return n_tokens / 2


def _read_input(path: str | None, action: str, what: str) -> dict:
    if not path:
        raise ValueError(f"fdtm {action} needs --input ({what})")
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot read {path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"cannot read {path}: expected a JSON object")
    return data


def _fdtm_plan(args: argparse.Namespace) -> int:
    from aa_compile import dtm

    if args.budget is not None:
        # FDTM plan at a fixed budget (no sweep needed), beside uniform pruning at that sparsity
        settings = _fdtm_settings(args, {}, None)
        model, _ = _fdtm_model(settings["checkpoint"], settings["seed"])
        prompts = dtm.byte_prompts(settings["n_prompts"], settings["prompt_len"],
                                   seed=settings["seed"])
        n = settings["n_tokens"]
        planner = dtm.refine_plan if args.budget_method == "refine" else dtm.budget_plan
        ref = dtm.generate(model, prompts, n)  # the base continuations, once for both
        res = planner(model, prompts, n, args.budget, reference=ref, progress=True)
        uniform = dtm.apply(model, {c: f"prune:{args.budget}" for c in dtm.find_components(model)})
        res["uniform"] = dtm.dtm(model, uniform, prompts, n, reference=ref).summary()
        res["settings"] = settings
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"plan: {len(res['plan'])} components, {res['share_saved']:.1%} of component bytes "
              f"pruned in {res['rounds']} rounds; fdt_median={res['measured']['fdt_median']:.1f} "
              f"(uniform prune:{args.budget}: {res['uniform']['fdt_median']:.1f}), fdt_mean="
              f"{res['measured']['fdt_mean']:.1f} ({res['uniform']['fdt_mean']:.1f}); wrote "
              f"{args.out}")
        return 0
    data = _read_input(args.input, "plan", "the sweep JSON of fdtm sweep, or --budget")
    if "results" not in data or "n_tokens" not in data:
        raise ValueError(f"cannot read {args.input}: not a sweep JSON (no 'results'/'n_tokens')")
    if args.n_tokens is not None and args.n_tokens != data["n_tokens"]:
        raise ValueError(f"--n-tokens {args.n_tokens} differs from the sweep's n_tokens="
                         f"{data['n_tokens']}: the plan is measured at the sweep's N")
    settings = _fdtm_settings(args, data, args.input)
    tau = args.tau if args.tau is not None else default_tau(settings["n_tokens"])
    origin = "command line" if args.tau is not None else "default: n_tokens / 2"
    print(f"fdtm plan: tau={tau:g} ({origin}), statistic={args.statistic}", file=sys.stderr)
    model, _ = _fdtm_model(settings["checkpoint"], settings["seed"])
    prompts = dtm.byte_prompts(settings["n_prompts"], settings["prompt_len"],
                               seed=settings["seed"])
    res = dtm.plan(model, data, prompts, tau, args.statistic, progress=True)
    res["settings"] = {**settings, "tau": tau, "statistic": args.statistic, "sweep": args.input}
    Path(args.out).write_text(json.dumps(res, indent=2))
    m = res["measured"]
    print(f"plan: {len(res['plan'])} components, {res['share_saved']:.1%} of component bytes "
          f"saved; measured {args.statistic}={m[args.statistic]:.1f} (tau={tau:g}); "
          f"wrote {args.out}")
    return 0


def _fdtm_apply(args: argparse.Namespace) -> int:
    from aa_compile import dtm

    data = _read_input(args.input, "apply", "the plan JSON of fdtm plan")
    plan = data.get("plan", data)
    recorded = data.get("settings", {}) if isinstance(data.get("settings"), dict) else {}
    settings = _fdtm_settings(args, recorded, args.input)
    if args.tau is not None:
        tau, origin = args.tau, "command line"
    elif "tau" in recorded:
        tau, origin = recorded["tau"], args.input
    else:
        tau, origin = default_tau(settings["n_tokens"]), "default: n_tokens / 2"
    print(f"fdtm apply: tau={tau:g} ({origin})", file=sys.stderr)
    model, tokenizer = _fdtm_model(settings["checkpoint"], settings["seed"])
    prompts = dtm.byte_prompts(settings["n_prompts"], settings["prompt_len"],
                               seed=settings["seed"])
    small = dtm.apply(model, plan)
    r = dtm.dtm(model, small, prompts, settings["n_tokens"]).summary(tau)
    dtm.save_applied(small, plan, args.out, tokenizer=tokenizer,
                     measured={**r, "tau": tau},
                     training={"fdtm_apply": {**settings, "tau": tau, "plan": args.input}})
    print(json.dumps(r, indent=2))
    print(f"wrote the compressed model to {args.out}; load it with "
          f"aa_compile.dtm.load_applied({str(args.out)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aa-compile", formatter_class=HelpFormatter,
        description="aa-compile: torch.compile backend, FX passes and aa:: kernels.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, description: str | None = None):
        p = sub.add_parser(name, help=help_, description=description or help_,
                           formatter_class=HelpFormatter)
        return p

    info = command("info", "versions, devices, registered ops and passes")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)

    report = command("report", "compile the reference transformer with backend='aa' and print "
                     "the report")
    _model_arguments(report, d_model=256, vocab_size=1024)
    report.add_argument("--seq-len", type=int, default=32, help="tokens of the random input")
    report.add_argument(
        "--inner-compiler", default="eager", choices=["inductor", "eager", "aot_eager"],
        help="what compiles the graph after the passes (eager: quick)",
    )
    report.add_argument("--json", action="store_true", help="print JSON")
    add_threads_argument(report)
    report.set_defaults(func=_report)

    gen = command("generate", "continue a text with a saved model (greedy)",
                  "Greedy continuation of a prompt by a saved model directory of any kind "
                  "(the --out of a training CLI or of fdtm apply) or a released HAT (Hugging "
                  "Face layout) or T-FREE (trigrams repository layout) folder, with the cached "
                  "decoding. Prints the text, and to stderr the words/s (T-FREE), bytes/s "
                  "(HAT) or tokens/s figure of the second of two identical runs (the first compiles).")
    gen.add_argument("text", nargs="?", default=None, metavar="PROMPT",
                     help="the text to continue (or --prompt; default: "
                     f"{DEFAULT_PROMPT!r})")
    gen.add_argument("--checkpoint", required=True, metavar="DIR",
                     help="saved model directory or released HAT / T-FREE folder (required, "
                     "no default)")
    gen.add_argument("--prompt", default=None,
                     help=f"the text to continue (default: {DEFAULT_PROMPT!r})")
    gen.add_argument("--max-new-tokens", type=int, default=32,
                     help="how much to generate: words (T-FREE), bytes (HAT) or tokens "
                     "(transformer, u-μP)")
    gen.add_argument("--tokenizer", default=None,
                     help="'bytes' (UTF-8 bytes) or a local Hugging Face tokenizer "
                     "directory/name (default: the checkpoint's, else bytes; not for T-FREE)")
    gen.add_argument("--backend", choices=["aa", "eager"], default="aa",
                     help="aa: torch.compile(backend='aa') of what the cached decoding calls; "
                     "eager: the reference modules as they are")
    gen.add_argument("--inner-compiler", choices=["inductor", "eager", "aot_eager"],
                     default=None, help="what compiles the graphs after the aa passes "
                     "(default: inductor on CUDA, eager on the CPU, where inductor's compile "
                     "time outweighs a short generation)")
    gen.add_argument("--device", default=None,
                     help="where the model runs (default: cuda if available, else cpu)")
    gen.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                     help="convert the model (default: as stored)")
    gen.add_argument("--words", default=None, metavar="FILE",
                     help="T-FREE: a text file of extra dictionary words, one per line "
                     "(default: none; the prompt's words are always added)")
    gen.add_argument("--max-words", type=int, default=None, metavar="N",
                     help="T-FREE: keep only the checkpoint's first N dictionary words (the "
                     "most frequent; default: all)")
    add_threads_argument(gen)
    gen.set_defaults(func=_generate)

    ex = command("explain", "AtMan explanation of a target continuation on the reference "
                 "transformer")
    ex.add_argument("--checkpoint", metavar="PATH",
                    help="saved model directory, or a torch file: a state dict or {'config', "
                    "'state_dict'} (default: a random model of the size options below)")
    ex.add_argument("--prompt", help="prompt text, tokenized with --tokenizer (default: "
                    "--prompt-ids, else random ids)")
    ex.add_argument("--target", help="target text, tokenized with --tokenizer (default: "
                    "--target-ids, else random ids)")
    ex.add_argument("--prompt-ids", metavar="IDS", help="prompt token ids ('1 2 3'; default: "
                    "random)")
    ex.add_argument("--target-ids", metavar="IDS", help="target token ids (default: random)")
    ex.add_argument("--tokenizer", default=None,
                    help="'bytes' (UTF-8 bytes, for byte-level models with vocab >= 256) or a "
                    "local Hugging Face tokenizer directory/name (default: the checkpoint's, "
                    "else bytes)")
    ex.add_argument("--prompt-len", type=int, default=16, help="random prompt length")
    ex.add_argument("--target-len", type=int, default=4, help="random target length")
    ex.add_argument("--mode", default="log_additive", choices=["log_additive", "multiplicative"],
                    help="how a suppressed token's attention is scaled")
    ex.add_argument("--factor", type=float, default=0.1,
                    help="attention multiplier of a suppressed token")
    ex.add_argument("--conceptual-threshold", type=float, default=None,
                    help="also suppress tokens whose embeddings have cosine similarity >= this "
                    "(default: None, off)")
    _model_arguments(ex, d_model=64, vocab_size=256)
    ex.add_argument("--max-seq-len", type=int, default=512, help="random model: positions")
    ex.add_argument("--seed", type=int, default=0, help="seed of the random model and ids")
    ex.add_argument("--png", help="write the heat-map PNG here")
    ex.add_argument("--json", action="store_true", help="print JSON")
    add_threads_argument(ex)
    ex.set_defaults(func=_explain)

    fd = command("fdtm", "Divergent Token Metrics: per-component sweep, plan, apply "
                 "(pruning/int8)",
                 "Divergent Token Metrics: sweep measures each component at each compression, "
                 "plan picks a compression per component, apply writes the compressed model.")
    actions = fd.add_subparsers(dest="action", required=True, metavar="ACTION")
    _fdtm_sweep_parser(actions)
    _fdtm_plan_parser(actions)
    _fdtm_apply_parser(actions)
    add_export_subcommand(sub)
    add_sae_subcommand(sub)
    add_mad_subcommand(sub)
    return parser


def _fdtm_common(p: argparse.ArgumentParser, recorded_in: str | None) -> None:
    """The model and prompt options; ``recorded_in``: the --input they default to."""
    src = f"the {recorded_in}'s, else " if recorded_in else ""
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="saved model directory (bench.train_reference --out) or torch file "
                   f"{{'config', 'state_dict'}} (default: {src}a random byte-level "
                   "transformer)")
    p.add_argument("--n-prompts", type=int, default=None,
                   help=f"prompts (default: {src}{FDTM_DEFAULTS['n_prompts']})")
    p.add_argument("--prompt-len", type=int, default=None,
                   help=f"bytes per prompt (default: {src}{FDTM_DEFAULTS['prompt_len']})")
    p.add_argument("--n-tokens", type=int, default=None,
                   help=f"tokens generated per prompt, N (default: {src}"
                   f"{FDTM_DEFAULTS['n_tokens']})")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the prompts and the random model (default: {src}0)")
    add_threads_argument(p)


def _fdtm_sweep_parser(actions) -> None:
    p = actions.add_parser(
        "sweep", formatter_class=HelpFormatter,
        help="FDT of every component at every compression level",
        description="Measure the first divergent token (FDT) of every component at every "
        "compression level, with only that component compressed; writes OUT/sweep.json (with "
        "the settings plan and apply reuse) and OUT/sweep.png.")
    _fdtm_common(p, None)
    p.add_argument("--levels", default="prune:0.25,prune:0.5,prune:0.75,prune:0.9,2:4,int8",
                   help="comma-separated compressions")
    p.add_argument("--no-reuse", action="store_true",
                   help="recompute every run from scratch (no cached layer states)")
    p.add_argument("--out", default="fdtm_out", metavar="DIR", help="output folder")
    p.set_defaults(func=_fdtm_sweep)


def _fdtm_plan_parser(actions) -> None:
    p = actions.add_parser(
        "plan", formatter_class=HelpFormatter,
        help="a compression per component from a sweep (or at a fixed budget)",
        description="Pick a compression per component: greedily from a sweep (--input) under "
        "the constraint statistic(FDT) >= tau, or, with --budget, an FDTM plan at a fixed "
        "share of pruned weights. Takes N, the prompts and the checkpoint from the sweep unless "
        "given; prints where each value came from.")
    _fdtm_common(p, "sweep")
    p.add_argument("--input", metavar="SWEEP_JSON",
                   help="sweep.json of fdtm sweep (default: none; required without --budget)")
    p.add_argument("--tau", type=float, default=None,
                   help="the constraint statistic(FDT) >= tau (default: n_tokens / 2, which "
                   "the sweep's N can meet)")
    p.add_argument("--statistic", default="fdt_median",
                   choices=["fdt_mean", "fdt_median", "fdt_p10", "fdt_p25", "share_fdt_ge_tau",
                            "fdt_min"], help="the FDT statistic the constraint is on")
    p.add_argument("--budget", type=float, default=None, metavar="SHARE",
                   help="prune this share of the component weights (0-1) with an FDTM plan "
                   "(--budget-method; no --input needed) instead of the --tau constraint on a "
                   "sweep; also measures uniform pruning at that sparsity (default: None, off)")
    p.add_argument("--budget-method", choices=["refine", "rounds"], default="refine",
                   help="with --budget: 'refine' (exchanges of pruned weights between "
                   "components starting from uniform pruning, aa_compile.dtm.refine) or "
                   "'rounds' (the paper's rounds from the dense model, aa_compile.dtm.rounds)")
    p.add_argument("--out", default="fdtm_plan.json", metavar="JSON", help="plan JSON to write")
    p.set_defaults(func=_fdtm_plan)


def _fdtm_apply_parser(actions) -> None:
    p = actions.add_parser(
        "apply", formatter_class=HelpFormatter,
        help="apply a plan and save the compressed model",
        description="Apply a plan (pruned weights, int8 linears), measure its FDT against the "
        "base model and save it as a model directory; load it with "
        "model = aa_compile.dtm.load_applied('DIR'). Takes N, tau, the prompts and the "
        "checkpoint from the plan unless given.")
    _fdtm_common(p, "plan")
    p.add_argument("--input", metavar="PLAN_JSON", help="plan JSON of fdtm plan (required)")
    p.add_argument("--tau", type=float, default=None,
                   help="tau of the reported share_fdt_ge_tau (default: the plan's, else "
                   "n_tokens / 2)")
    p.add_argument("--out", default="fdtm_applied", metavar="DIR",
                   help="saved model directory to write")
    p.set_defaults(func=_fdtm_apply)


def _model_arguments(parser: argparse.ArgumentParser, *, d_model: int, vocab_size: int) -> None:
    """The reference transformer's size options, shared by the subcommands that build one."""
    parser.add_argument("--d-model", type=int, default=d_model, help="random model: width")
    parser.add_argument("--n-layers", type=int, default=2, help="random model: blocks")
    parser.add_argument("--n-heads", type=int, default=4, help="random model: attention heads")
    parser.add_argument("--n-kv-heads", type=int, default=None,
                        help="random model: key/value heads (default: None, = --n-heads)")
    parser.add_argument("--vocab-size", type=int, default=vocab_size,
                        help="random model: vocabulary size")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "threads"):
        set_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"aa-compile: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
