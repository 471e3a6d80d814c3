"""Training and scoring of one MAD run, as ``mad-lab`` does it, on CPU.

AdamW, a cosine schedule from ``lr`` to 1e-6 over the epochs (stepped once per epoch),
cross-entropy that skips ``IGNORE`` targets, batch 128, and after every epoch the macro accuracy
on the test set; training stops early once it reaches 0.999. The run's result is then the
train and test loss and accuracy of the final model. Float32 on CPU (``mad-lab`` trains in
bf16 on a GPU).

Two additions that ``mad-lab`` does not have, off by default: a linear warm-up of the lr over
the first ``warmup_steps`` steps, and a length curriculum (``crop_len``, ``crop_epochs``): the
first epochs train on the first ``crop_len`` tokens of every training sequence, which gets
attention past the in-context recall plateau in far fewer steps (``docs/mad.md``). The test
set is always scored at full length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import TaskData, make_data
from .metrics import ClassCounts
from .settings import Setting
from .tasks import IGNORE
from .zoo import model_spec

STOP_ACCURACY = 0.999
MIN_LR = 1e-6


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One run: a model on a setting at one learning rate and weight decay."""

    model: str
    setting: Setting
    lr: float = 5e-4
    weight_decay: float = 0.0
    epochs: int = 200
    batch_size: int = 128
    dim: int = 128
    stop_accuracy: float = STOP_ACCURACY
    threads: int = 1
    warmup_steps: int = 0
    crop_len: int | None = None
    crop_epochs: int = 0

    def __post_init__(self) -> None:
        model_spec(self.model)  # raises on an unknown name
        check_schedule(self.warmup_steps, self.crop_len, self.crop_epochs)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("epochs", "batch_size", "dim", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RunConfig.{name} must be a positive int, got {value!r}")


def check_schedule(warmup_steps: int, crop_len: int | None, crop_epochs: int) -> None:
    """Raise ``ValueError`` for a bad warm-up or length curriculum."""
    for name, value in (("warmup_steps", warmup_steps), ("crop_epochs", crop_epochs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if crop_len is not None and (not isinstance(crop_len, int) or isinstance(crop_len, bool)
                                 or crop_len < 1):
        raise ValueError(f"crop_len must be a positive int or None, got {crop_len!r}")
    if (crop_len is None) != (crop_epochs == 0):
        raise ValueError(f"crop_len and crop_epochs go together (a length and how many epochs "
                         f"train at it), got crop_len={crop_len!r}, crop_epochs={crop_epochs!r}")


@functools.lru_cache(maxsize=4)
def cached_data(setting: Setting) -> TaskData:
    """`make_data`, kept for the next run on the same setting in this process."""
    return make_data(setting)


def loss_of(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor, num_classes: int,
             batch_size: int = 256) -> dict[str, float]:
    """Mean loss, macro accuracy (MAD's metric) and token accuracy over a whole set."""
    model.eval()
    counts = ClassCounts(num_classes)
    loss_sum, n_tokens = 0.0, 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size], targets[i:i + batch_size]
        logits = model(x)
        n = int((y != IGNORE).sum())
        if n:
            loss_sum += float(loss_of(logits, y)) * n
            n_tokens += n
        counts.update(logits, y)
    model.train()
    return {"loss": loss_sum / max(n_tokens, 1), "acc": counts.macro_accuracy(),
            "token_acc": counts.micro_accuracy()}


def train_model(model: nn.Module, data: TaskData, *, lr: float = 5e-4,
                weight_decay: float = 0.0, epochs: int = 200, batch_size: int = 128,
                stop_accuracy: float = STOP_ACCURACY, param_groups: list[dict] | None = None,
                warmup_steps: int = 0, crop_len: int | None = None, crop_epochs: int = 0,
                on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` on ``data`` (AdamW, cosine over ``epochs``, early stop once the test
    macro accuracy reaches ``stop_accuracy``); returns the final metrics.

    ``warmup_steps``: linear lr warm-up over the first steps. ``crop_len`` / ``crop_epochs``:
    the first ``crop_epochs`` epochs train on the first ``crop_len`` tokens of each sequence.
    ``on_epoch`` sees ``{"epoch", "train_loss", "test_loss", "test_acc", "test_token_acc",
    "seconds"}`` after every epoch (e.g. to log a long run)."""
    check_schedule(warmup_steps, crop_len, crop_epochs)
    seed = data.setting.seed
    torch.manual_seed(seed)
    x_train = torch.from_numpy(data.train_inputs)
    y_train = torch.from_numpy(data.train_targets)
    x_test = torch.from_numpy(data.test_inputs)
    y_test = torch.from_numpy(data.test_targets)
    vocab = data.setting.vocab_size
    groups = param_groups if param_groups is not None else model.parameters()
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=MIN_LR)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    test = {"acc": 0.0}
    epochs_run = 0
    step = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=shuffle)
        length = crop_len if epoch < crop_epochs else x_train.shape[1]
        loss_sum, n_steps = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if step < warmup_steps:
                for group, base in zip(opt.param_groups, sched.get_last_lr()):
                    group["lr"] = base * (step + 1) / warmup_steps
            loss = loss_of(model(x_train[idx, :length]), y_train[idx, :length])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step < warmup_steps:
                for group, base in zip(opt.param_groups, sched.get_last_lr()):
                    group["lr"] = base
            step += 1
            loss_sum += float(loss.detach())
            n_steps += 1
        sched.step()
        epochs_run += 1
        test = evaluate(model, x_test, y_test, vocab)
        if on_epoch is not None:
            on_epoch({"epoch": epochs_run, "train_loss": loss_sum / max(n_steps, 1),
                      "test_loss": test["loss"], "test_acc": test["acc"],
                      "test_token_acc": test["token_acc"],
                      "seconds": round(time.perf_counter() - start, 1)})
        if test["acc"] >= stop_accuracy:
            break
    train = evaluate(model, x_train, y_train, vocab)
    return {"epochs_run": epochs_run, "train_loss": train["loss"], "train_acc": train["acc"],
            "test_loss": test.get("loss", math.nan), "test_acc": test["acc"],
            "test_token_acc": test.get("token_acc", math.nan)}


def run_one(run: RunConfig) -> dict:
    """Build the model, generate (or reuse) the data, train, and return one result row (with
    ``run.threads`` torch threads, restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(run.threads)
    try:
        return train_run(run)
    finally:
        torch.set_num_threads(previous)


def train_run(run: RunConfig) -> dict:
    start = time.perf_counter()
    spec = model_spec(run.model)
    torch.manual_seed(run.setting.seed)
    model = spec.model_for(run.setting, run.dim)
    groups = spec.param_groups(model, run.lr, run.weight_decay) if spec.param_groups else None
    data = cached_data(run.setting)
    metrics = train_model(model, data, lr=run.lr, weight_decay=run.weight_decay,
                          epochs=run.epochs, batch_size=run.batch_size,
                          stop_accuracy=run.stop_accuracy, param_groups=groups,
                          warmup_steps=run.warmup_steps, crop_len=run.crop_len,
                          crop_epochs=run.crop_epochs)
    s = run.setting
    return {"model": run.model, "task": s.task, "setting": s.name, "change": s.change,
            "vocab_size": s.vocab_size, "seq_len": s.seq_len,
            "num_train_examples": s.num_train_examples, "lr": run.lr,
            "weight_decay": run.weight_decay, "epochs": run.epochs, "dim": run.dim,
            "batch_size": run.batch_size, "warmup_steps": run.warmup_steps,
            "crop_len": run.crop_len, "crop_epochs": run.crop_epochs,
            "params": sum(p.numel() for p in model.parameters()), "leakage": data.leakage,
            **metrics, "seconds": round(time.perf_counter() - start, 2)}
