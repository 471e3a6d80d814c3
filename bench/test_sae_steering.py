"""Steering overhead: a concept SAE attached inside the compiled model vs hooks, one forward.

The reference transformer (d=512, 8 layers, vocabulary 4096, 128 tokens) with a TopK SAE (4096
latents, k=32) reading ``block.4``, inference forward. Variants, interleaved in one run:

- ``eager`` / ``aa``: the unsteered model, as is and compiled with ``backend="aa"``;
- ``aa_gsae`` / ``aa_scar`` / ``aa_delta``: ``aa_compile.sae.attach(mode=...)`` compiled with
  ``backend="aa"``;
- ``aa_sae_alone``: the SAE's own encode + decode (its reconstruction) of the site activations,
  compiled with ``backend="aa"``;
- ``hook_gsae`` / ``hook_scar`` / ``hook_delta``: the peer, the same steering math as a Hugging
  Face-style ``register_forward_hook`` on the site module, in eager (how the SCAR and G-SAE
  public code steer); the full set adds ``hook_*_aa``, the hooked model under
  ``torch.compile(backend="aa")`` (dynamo inlines the hook).

Every compiled variant is one graph (``fullgraph=True``: a graph break fails its build). The
SAE is randomly initialised with its concept latent's bias raised so that the latent fires at
every token (every token is steered); α = 2. Quick: one timed round per repeat (the set stays
near a minute on two idle cores); full: three.

The issue's bars, from the medians of one run: ``aa_gsae / aa ≤ 1.05`` and
``aa_scar``, ``aa_delta / (aa + aa_sae_alone) ≤ 1.1``. Each steered row names the variants
its cost is held against in ``extra_info["cost_vs"]`` (`COST_VS`), and after the case's last
benchmark a summary line (``sae_steering <case>: ...``) prints every median and the costs.

Numerics: the first call of each variant after its timing is compared with eager steering
(``attach`` uncompiled; the plain model for ``aa``; the SAE's forward for ``aa_sae_alone``);
``extra_info["max_rel_diff_vs_eager"]`` is the largest difference of logits and concept scores
(relative to the largest reference entry), and the test fails above the dtype's tolerance (a
correctness check, not a timing one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aa_compile  # noqa: F401  (registers the backend)
from aa_compile.models.sae import SAEConfig, SparseAutoencoder
from aa_compile.models.sae.model import NORM_EPS
from aa_compile.models.transformer import Transformer, TransformerConfig
from aa_compile.sae import attach
from aa_compile.sae.sites import site_module
from bench.harness import CaseLabels, bench_variant, fresh_copy, inference_step, seed_all

WORKLOAD = "sae_steering_fwd"
MODES = ("gsae", "scar", "delta")
ALPHA = 2.0
CONCEPT = 0
#: variants of the quick set, in the order they interleave
QUICK_VARIANTS = ("eager", "aa", *(f"aa_{m}" for m in MODES), "aa_sae_alone",
                  *(f"hook_{m}" for m in MODES))
#: the full set adds the hooked model compiled
FULL_VARIANTS = (*QUICK_VARIANTS, *(f"hook_{m}_aa" for m in MODES))
#: steered variant -> the variants whose summed medians its cost is held against (the bars)
COST_VS = {"aa_gsae": ("aa",), "aa_scar": ("aa", "aa_sae_alone"),
           "aa_delta": ("aa", "aa_sae_alone")}
#: largest |difference| to eager steering, relative to the largest |reference| entry, per dtype
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


@dataclasses.dataclass(frozen=True)
class SteeringCase(CaseLabels):
    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int
    batch: int
    seq: int
    latents: int
    k: int
    layer: int
    dtype: torch.dtype

    SHAPE = "B{batch}xS{seq} d{d_model} L{n_layers} V{vocab_size} SAE{latents} k{k} @block.{layer}"
    ID = "d{d_model}-S{seq}-L{latents}-k{k}-{dtype}"

    @property
    def site(self) -> str:
        return f"block.{self.layer}"


def steering_cases(quick: bool, device: str) -> list[SteeringCase]:
    """The issue's d=512 reference model, 8 layers, vocabulary 4096, SAE 4096 latents, k=32 at
    ``block.4``: 1x128 tokens (both sets); the full set adds 4x512 tokens (bfloat16 on CUDA)."""
    small = SteeringCase(512, 8, 8, 4096, 1, 128, 4096, 32, 4, torch.float32)
    if quick:
        return [small]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return [small, dataclasses.replace(small, batch=4, seq=512, dtype=dtype)]


#: the shapes of this workload file, per --quick / --device (see bench/conftest.py)
CASES = steering_cases


def variants(quick: bool) -> tuple[str, ...]:
    return QUICK_VARIANTS if quick else FULL_VARIANTS


def pytest_generate_tests(metafunc):
    """``variant`` per set: the compiled hooks only in the full set."""
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", variants(metafunc.config.getoption("--quick")))


# -- the peer: steering as a forward hook --------------------------------------------------------


def hook_steer(sae: SparseAutoencoder, mode: str, latent: int, alpha: float, x: Tensor
               ) -> tuple[Tensor, Tensor]:
    """``(steered x, concept scores)``: the steering formulas of `aa_compile.sae.steering`
    written out as hook code would (dense latents, one column edited), for ``x [..., d]``;
    the same work as `attach` (G-SAE encodes the concept latents only)."""
    x_n, mean, std = sae.normalize(x)
    n_scores = max(sae.config.n_concepts, 1)
    if mode == "gsae":
        scores = F.linear(x_n - sae.pre_bias, sae.encoder.weight[:n_scores],
                          sae.latent_bias[:n_scores])
        d_c = sae.decoder.weight[:, latent]
        return x + alpha * x.norm(dim=-1, keepdim=True) / d_c.norm() * d_c, scores
    pre = sae.encode_pre(x_n)
    scores = pre[..., :n_scores]
    latents = sae.activate(pre)
    steered = latents.clone()
    steered[..., latent] = alpha * latents[..., latent].abs()
    if mode == "scar":
        return sae.denormalize(sae.decode_n(steered), mean, std), scores
    if mode == "delta":  # decode(steered) - decode(original): only the edited column differs
        d_c = sae.decoder.weight[:, latent]
        change = (steered[..., latent] - latents[..., latent]).unsqueeze(-1)
        return x + change * d_c * (std + NORM_EPS), scores
    raise ValueError(f"unknown steering mode {mode!r}")


class Hooked(nn.Module):
    """``model`` with a forward hook on ``site`` steering its output; returns ``(logits,
    scores)`` like `aa_compile.sae.SteeredModel` (the hook keeps the scores it computed)."""

    def __init__(self, model: nn.Module, sae: SparseAutoencoder, site: str, mode: str) -> None:
        super().__init__()
        self.model, self.sae, self.mode = model, sae, mode
        self.scores: list[Tensor] = []
        site_module(model, site).register_forward_hook(self.hook)

    def hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        steered, scores = hook_steer(self.sae, self.mode, CONCEPT, ALPHA, output)
        self.scores.append(scores)
        return steered

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        self.scores.clear()
        logits = self.model(ids)
        return logits, self.scores[-1]


# -- set-up -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(case, settings):
    """The model, the SAE, token ids and the site activations, built once per case; every
    variant gets its own copies. ``reference[variant]``: eager steering's outputs."""
    seed_all(0)
    dev = settings.device
    cfg = TransformerConfig(vocab_size=case.vocab_size, d_model=case.d_model,
                            n_layers=case.n_layers, n_heads=case.n_heads,
                            max_seq_len=case.seq)
    model = Transformer(cfg).to(device=dev, dtype=case.dtype).eval()
    sae_cfg = SAEConfig(case.d_model, case.latents, k=case.k, activation="topk-sigmoid",
                        n_concepts=3)
    sae = SparseAutoencoder(sae_cfg).to(device=dev, dtype=case.dtype).eval()
    with torch.no_grad():  # the steered latent fires at every token, so every token is steered
        sae.latent_bias[CONCEPT] = 10.0
    ids = torch.randint(0, case.vocab_size, (case.batch, case.seq), device=dev)
    site_acts: list[Tensor] = []
    handle = site_module(model, case.site).register_forward_hook(
        lambda m, a, out: site_acts.append(out.detach()))
    with torch.no_grad():
        reference = {"eager": (model(ids),), "aa": (model(ids),)}
        handle.remove()
        x = site_acts[0]
        reference["aa_sae_alone"] = (sae(x).recons,)
        for mode in MODES:
            steered = attach(fresh_copy(model), fresh_copy(sae), site=case.site, mode=mode,
                             concept=CONCEPT, alpha=ALPHA)
            ref = tuple(steered(ids))
            for name in (f"aa_{mode}", f"hook_{mode}", f"hook_{mode}_aa"):
                reference[name] = ref
    return dict(model=model, sae=sae, ids=ids, x=x, reference=reference)


def compiled(fn: Callable) -> Callable:
    """``fn`` compiled with ``backend="aa"`` as one graph (a graph break raises)."""
    return torch.compile(fn, backend="aa", fullgraph=True)


def build(variant: str, case: SteeringCase, base: dict) -> Callable[[Tensor], object]:
    """The callable of ``variant`` (see the module docstring), on fresh copies."""
    model, sae = fresh_copy(base["model"]).eval(), fresh_copy(base["sae"]).eval()
    if variant == "eager":
        return model
    if variant == "aa":
        return compiled(model)
    if variant == "aa_sae_alone":
        return compiled(lambda x: sae(x).recons)
    kind, mode = variant.split("_")[:2]
    if kind == "aa":
        return compiled(attach(model, sae, site=case.site, mode=mode, concept=CONCEPT,
                               alpha=ALPHA))
    hooked = Hooked(model, sae, case.site, mode)
    return compiled(hooked) if variant.endswith("_aa") else hooked


def max_rel_diff(got: object, want: tuple[Tensor, ...]) -> float:
    """Largest |got - want| over the outputs, relative to the largest |want| entry."""
    got = (got,) if isinstance(got, Tensor) else tuple(got)
    assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
    scale = max(float(w.abs().max()) for w in want)
    return max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want)) / scale


#: (case id, variant) -> raw rounds of every repeat so far
_ROUNDS: dict[tuple[str, str], list[float]] = {}


def record_rounds(case_id: str, variant: str, benchmark) -> str:
    """Keep this repeat's rounds and return the summary line of the case so far: every
    variant's median over its repeats and each steered variant's cost (its median over the
    summed medians of `COST_VS`)."""
    stats = getattr(benchmark, "stats", None)
    data = list(getattr(getattr(stats, "stats", None), "data", None) or [])
    _ROUNDS.setdefault((case_id, variant), []).extend(data)
    medians = {v: float(np.median(r)) for (c, v), r in _ROUNDS.items() if c == case_id and r}
    parts = []
    for steered, against in COST_VS.items():
        if steered in medians and all(a in medians for a in against):
            cost = medians[steered] / sum(medians[a] for a in against)
            parts.append(f"{steered}/({'+'.join(against)}) = {cost:.3f}")
    ms = "  ".join(f"{v} {m * 1e3:.1f} ms" for v, m in medians.items())
    return f"sae_steering {case_id}: {ms}" + ("\n  " + "  ".join(parts) if parts else "")


def test_sae_steering_fwd(benchmark, settings, case, base, variant, repeat, pytestconfig):
    ids, x = base["ids"], base["x"]
    arg = x if variant == "aa_sae_alone" else ids
    calls: list[Callable[[], object]] = []

    def step(fn):
        calls.append(inference_step(fn, arg))
        return calls[-1]

    # quick: one timed round per repeat (the set stays under a minute on two cores)
    kind = "task" if settings.quick else "model"
    first = bench_variant(benchmark, settings, case, variant, WORKLOAD, kind=kind,
                          build=lambda: build(variant, case, base), step=step)
    if variant in COST_VS:
        benchmark.extra_info["cost_vs"] = list(COST_VS[variant])
    line = record_rounds(case.id, variant, benchmark)
    last = (variant == variants(settings.quick)[-1]
            and repeat == pytestconfig.getoption("--repeats") - 1)
    if last:  # the case's last benchmark: print its medians and costs past pytest's capture
        plugins = pytestconfig.pluginmanager
        reporter = plugins.getplugin("terminalreporter")
        capture = plugins.getplugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line("\n" + line)
    if first:
        err = max_rel_diff(calls[-1](), base["reference"][variant])
        benchmark.extra_info["max_rel_diff_vs_eager"] = err
        assert err < TOLERANCE[case.dtype], f"{variant} differs from eager steering by {err:.2e}"
