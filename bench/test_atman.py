"""AtMan explanation workload: explain a 16-token target by every prompt token.

Variants (all log_additive, factor 0.1, the production default; same model and ids):
- ``naive``: one full forward per perturbation (batch 1), the suppression as a dense
  ``[S, S]`` additive mask handed to SDPA: n + 1 forwards;
- ``batched_dense``: the original's batching: 25 perturbations per forward, each with its own
  dense ``[S, S]`` mask (``[25, 1, S, S]``), full sequences;
- ``aa``: ``aa_compile.atman.explain`` with its defaults: ``aa::atman_attention`` with the
  compact spec, prefix sharing (a batch runs only from its first suppressed position, the
  unperturbed prefix's keys shared by the rows), the last layer and the head on the target
  rows only, batches within ``max_memory`` (default 1 GiB).

Quick: 128-token prompt. Full: 512-token prompt (S = 527 positions). Both d=256, 4 layers
(8 heads, 4 KV heads), vocab 8192: at d=512 / 8 layers the naive variant alone runs for most
of an hour on a 2-core CPU. Targets on a CPU (full): aa ≥ 8x naive and ≥ 1.7x batched_dense.
``extra_info["max_memory_mib"]``: the budget aa's ``peak_mib`` is to stay within;
``max_rel_diff_vs_naive``: every variant's scores against the naive loop's (asserted < 1e-4 of
the largest |score|). The naive variant has no ``compile_s``/``peak_mib`` (see the test).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from aa_compile.atman import explain
from aa_compile.atman.explain import DEFAULT_BUDGET
from aa_compile.models.transformer import Transformer, TransformerConfig
from bench.harness import run_benchmark, seed_all


@dataclasses.dataclass(frozen=True)
class AtmanCase:
    d_model: int
    n_layers: int
    prompt: int
    target: int
    vocab: int = 8192

    @property
    def shape(self) -> str:
        return f"P{self.prompt} T{self.target} d{self.d_model} L{self.n_layers} V{self.vocab}"

    @property
    def id(self) -> str:
        return f"atman-d{self.d_model}-L{self.n_layers}-P{self.prompt}"


def CASES(quick: bool, device: str):
    if quick:
        return [AtmanCase(256, 4, 128, 16)]
    return [AtmanCase(256, 4, 512, 16)]


VARIANTS = ("naive", "batched_dense", "aa")


@pytest.fixture(scope="module")
def base(case, settings):
    seed_all(0)
    cfg = TransformerConfig(vocab_size=case.vocab, d_model=case.d_model, n_layers=case.n_layers,
                            n_heads=8, n_kv_heads=4, max_seq_len=case.prompt + case.target)
    model = Transformer(cfg).to(settings.device).eval()
    ids = torch.randint(0, case.vocab, (case.prompt,), device=settings.device)
    tgt = torch.randint(0, case.vocab, (case.target,), device=settings.device)
    return model, ids, tgt


def dense_explain(model, prompt, target, batch: int, factor: float = 0.1) -> torch.Tensor:
    """The original's scheme: full sequences, a dense [S, S] mask per perturbation."""
    seq = torch.cat([prompt, target[:-1]])
    P, S = prompt.numel(), seq.numel()
    causal = torch.ones(S, S, dtype=torch.bool, device=seq.device).tril()
    neg = torch.zeros(S, S, device=seq.device).masked_fill_(~causal, float("-inf"))
    configs = [None] + list(range(P))
    state = {}
    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        return orig(q, k, v, attn_mask=state["mask"], scale=scale)

    ces = []
    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        with torch.no_grad():
            for lo in range(0, len(configs), batch):
                chunk = configs[lo:lo + batch]
                mask = neg.expand(len(chunk), 1, S, S).clone()
                for r, c in enumerate(chunk):
                    if c is not None:
                        mask[r, 0, :, c] += torch.log(torch.tensor(factor))
                state["mask"] = mask
                logits = model(seq[None].expand(len(chunk), -1))[:, P - 1:]
                lp = torch.log_softmax(logits.float(), -1)
                ces.append(-lp.gather(-1, target.view(1, -1, 1).expand(len(chunk), -1, 1))[..., 0])
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    ce = torch.cat(ces)
    return (ce[0][None] - ce[1:]).T  # [T, P]


#: (case id, variant) -> the scores of the variant's last call, to compare the variants
_SCORES: dict[tuple[str, str], torch.Tensor] = {}


@pytest.mark.parametrize("variant", VARIANTS)
def test_atman_explain(benchmark, settings, case, base, variant, repeat):
    model, ids, tgt = base
    if variant == "naive":
        def explain_once():
            return dense_explain(model, ids, tgt, batch=1)
    elif variant == "batched_dense":
        def explain_once():
            return dense_explain(model, ids, tgt, batch=25)
    else:
        def explain_once():
            return explain(model, ids, tgt, progress=False).scores

    def step():
        _SCORES[case.id, variant] = out = explain_once()
        return out

    # the naive loop skips the harness's first call and memory call (no compile, and its peak
    # is one batch-1 forward): at 512 tokens each of its calls takes minutes
    first = repeat == 0 and variant != "naive"
    run_benchmark(benchmark, step, settings=settings, workload="atman_explain", variant=variant,
                  shape=case.shape, dtype=torch.float32, kind="task", first=first)
    benchmark.extra_info.update(items=case.prompt, item_unit="perturbations",
                                max_memory_mib=DEFAULT_BUDGET / 2**20)
    ref = _SCORES.get((case.id, "naive"))
    if variant != "naive" and ref is not None:  # every variant computes the same explanation
        got = _SCORES[case.id, variant].cpu()
        ref = ref.cpu()
        err = float((got - ref).abs().max() / ref.abs().max())
        benchmark.extra_info["max_rel_diff_vs_naive"] = err
        assert err < 1e-4, f"{variant} differs from naive by {err:.2e} (relative to max |score|)"
