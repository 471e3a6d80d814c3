"""Many MAD runs at once: the model x setting x lr x wd grid in parallel worker processes.

Runs go to a ``concurrent.futures.ProcessPoolExecutor`` (spawned workers, each with its own
torch thread count); results come back in completion order under a progress bar. Workers keep
the last few generated data sets, so the grid orders runs setting by setting.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from collections.abc import Callable, Iterable, Sequence

from aa_compile.progress import progress

from .settings import LEARNING_RATES, WEIGHT_DECAYS, Setting
from .train import RunConfig, run_one
from .zoo import model_spec


def grid_runs(models: Sequence[str], settings: Iterable[Setting],
              lrs: Sequence[float] = LEARNING_RATES, wds: Sequence[float] = WEIGHT_DECAYS,
              **run_kwargs) -> list[RunConfig]:
    """Every (model, setting, lr, wd) a model can take, setting-major; ``run_kwargs`` go to each
    `RunConfig` (``epochs`` may also be a ``{task: epochs}`` dict)."""
    if not models:
        raise ValueError("models must name at least one model")
    if not lrs or not wds:
        raise ValueError("lrs and wds must each hold at least one value")
    epochs = run_kwargs.pop("epochs", None)
    runs = []
    for setting in settings:
        for model in models:
            if not model_spec(model).takes(setting):
                continue
            extra = dict(run_kwargs)
            if isinstance(epochs, dict):
                extra["epochs"] = epochs[setting.task]
            elif epochs is not None:
                extra["epochs"] = epochs
            for lr in lrs:
                for wd in wds:
                    runs.append(RunConfig(model, setting, lr=lr, weight_decay=wd, **extra))
    return runs


def run_grid(runs: Sequence[RunConfig], workers: int = 1,
             on_result: Callable[[dict], None] | None = None, show_progress: bool = True
             ) -> list[dict]:
    """Train every run; ``workers`` > 1 spreads them over that many processes.

    ``on_result`` sees each result as it arrives (e.g. to append it to a file). Returns the
    results in the order of ``runs``.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    results: list[dict | None] = [None] * len(runs)
    bar = progress(total=len(runs), desc="MAD runs", unit="run", disable=not show_progress)

    def done(i: int, result: dict) -> None:
        results[i] = result
        if on_result is not None:
            on_result(result)
        bar.set_postfix_str(f"{result['model']} {result['setting']} acc={result['test_acc']:.3f}")
        bar.update(1)

    try:
        if workers == 1:
            for i, run in enumerate(runs):
                done(i, run_one(run))
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = {pool.submit(run_one, run): i for i, run in enumerate(runs)}
                for future in cf.as_completed(futures):
                    done(futures[future], future.result())
    finally:
        bar.close()
    return [r for r in results if r is not None]
