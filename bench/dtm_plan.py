"""FDTM-guided pruning vs uniform pruning at equal parameter reduction, on the trained reference
transformer (`bench.train_reference`, trained once and cached: `bench.reference_cache`).

    python -m bench.dtm_plan --shares 0.25,0.5,0.75 --plot dtm_plan.png

For each share s: every component magnitude-pruned to sparsity s (uniform), and an FDTM plan
pruning the same share of the component weights (default `aa_compile.dtm.refine_plan`:
exchanges from the uniform plan; ``--method rounds``: `budget_plan`), both measured the same
way (FDT summaries of the applied models against the base model's greedy continuations), on the
planning prompts and on held-out prompts the plan never saw (``--eval-prompts``). Writes
``bench/results/dtm_plan.json`` (``--json``) and the plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from aa_compile import dtm
from bench.reference_cache import reference_model

RESULTS = Path(__file__).parent / "results"


def run(shares=(0.25, 0.5, 0.75), n_prompts: int = 32, prompt_len: int = 32,
        n_tokens: int = 64, method: str = "refine", eval_prompts: int = 64,
        statistic: str = "fdt_mean", steps=(0.25, 0.5, 0.75, 0.9), fraction: float = 0.25,
        rank: str = "result", rounds: int = 12, progress: bool = True) -> dict:
    model = reference_model(progress=progress)
    prompts = dtm.byte_prompts(n_prompts, prompt_len, seed=0)
    held_out = dtm.byte_prompts(eval_prompts, prompt_len, seed=1) if eval_prompts else None
    kwargs = ({"steps": steps, "fraction": fraction, "rank": rank} if method == "rounds"
              else {"rounds": rounds})
    t = time.perf_counter()
    rows = dtm.equal_reduction(model, prompts, n_tokens, shares, method=method,
                               eval_prompts=held_out, statistic=statistic, progress=progress,
                               **kwargs)
    return {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "n_prompts": n_prompts, "eval_prompts": eval_prompts, "prompt_len": prompt_len,
            "n_tokens": n_tokens, "method": method, "rank_statistic": statistic,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
            "seconds": time.perf_counter() - t, "rows": rows}


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = "plan_eval" in result["rows"][0]
    suffix = "_eval" if held else ""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, stat in zip(axes, ("fdt_median", "fdt_mean")):
        for key, label in (("uniform", "uniform pruning"), ("plan", f"FDTM {result['method']}")):
            xs = [r[f"share_{key}"] for r in result["rows"]]
            ax.plot(xs, [r[key + suffix][stat] for r in result["rows"]], "o-", label=label)
        ax.set_xlabel("share of component weights pruned")
        ax.set_ylabel(f"{stat} (tokens, N={result['n_tokens']})")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("trained reference transformer: FDT at equal parameter reduction"
                 + (f" ({result['eval_prompts']} held-out prompts)" if held else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dtm_plan", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shares", default="0.25,0.5,0.75", help="comma-separated sparsities")
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--n-tokens", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=64,
                    help="held-out prompts (another seed) both models are judged on; 0: none")
    ap.add_argument("--method", default="refine", choices=("refine", "rounds"),
                    help="refine: exchanges from the uniform plan (refine_plan); rounds: "
                         "budget_plan from the dense model")
    ap.add_argument("--statistic", default="fdt_mean", help="statistic that ranks the moves")
    ap.add_argument("--rounds", type=int, default=12,
                    help="refine: most rounds (each measures every component both ways)")
    ap.add_argument("--steps", default="0.25,0.5,0.75,0.9", help="rounds: the ladder")
    ap.add_argument("--fraction", type=float, default=0.25,
                    help="rounds: share of the movable components moved per round")
    ap.add_argument("--rank", default="result", choices=("result", "per_byte"),
                    help="rounds: moves ranked by the statistic's drop per byte, or its value")
    ap.add_argument("--json", default=str(RESULTS / "dtm_plan.json"), help="result file")
    ap.add_argument("--plot", metavar="PNG", help="write the comparison plot here")
    args = ap.parse_args(argv)
    out = run(tuple(float(s) for s in args.shares.split(",")), args.n_prompts,
              args.prompt_len, args.n_tokens, args.method, args.eval_prompts, args.statistic,
              tuple(float(s) for s in args.steps.split(",")), args.fraction, args.rank,
              args.rounds)
    RESULTS.mkdir(exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    sets = [("", "planning prompts")] + ([("_eval", "held-out prompts")]
                                         if args.eval_prompts else [])
    for suffix, what in sets:
        print(f"{what}:")
        print(f"{'share':>6} {'median uniform':>15} {'median FDTM':>12} {'mean uniform':>13} "
              f"{'mean FDTM':>10}")
        for r in out["rows"]:
            u, p = r["uniform" + suffix], r["plan" + suffix]
            print(f"{r['sparsity']:>6.2f} {u['fdt_median']:>15.1f} {p['fdt_median']:>12.1f} "
                  f"{u['fdt_mean']:>13.2f} {p['fdt_mean']:>10.2f}")
    if args.plot:
        plot(out, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
