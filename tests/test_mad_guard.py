"""The capability guard's rewrites on a tiny trained MAD model: FP8 linears through the ``aa``
backend, int8 weight-only plans from ``aa_compile.dtm``, and their bad inputs (seconds)."""

import pytest
import torch

from aa_compile.dtm import Int8Linear
from aa_compile.mad import (
    CompileRewrite,
    PlanRewrite,
    Setting,
    fp8_backend,
    guard,
    int8_budget_plan,
    make_data,
    model_spec,
    rewrite_from_spec,
    train_model,
)
from aa_compile.mad.rewrites import task_prompts
from aa_compile.models.mad import LanguageModel

TINY = Setting("memorization", vocab_size=16, seq_len=8, num_train_examples=32,
               num_test_examples=16)


@pytest.fixture(scope="module")
def trained():
    """attention + SwiGLU, dim 16, two blocks, trained for a few epochs (every linear has K and
    N a multiple of 16, as FP8 needs: qkv 16->48, out 16->16, gate/up 16->48, down 48->16)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LanguageModel(16, layers=("mh-attention", "swiglu") * 2, dim=16, max_length=8)
    train_model(model, make_data(TINY), lr=1e-2, epochs=10, batch_size=8)
    torch.set_num_threads(n)
    return model


def component_bytes(model):
    """(weight bytes of the 10 block linears, {name: (out, in)}), restated from the model."""
    shapes = {name: tuple(m.weight.shape) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.startswith("blocks.")}
    return sum(o * i for o, i in shapes.values()) * 4, shapes


def test_fp8_tensorwise_runs_the_block_linears_in_fp8(trained):
    out = guard(None, "fp8", TINY, trained=trained)
    # per block qkv, gate and up; the attention out-projection, the FFN down-projection and the
    # head are kept in float32 as u-μP keeps them
    assert out["aa_rewrites"] == {"fp8_linear": 6}
    assert out["rewrite"] == "fp8"
    assert out["delta_acc"] == pytest.approx(out["after"]["acc"] - out["before"]["acc"])
    # E4M3 rounds the operands (3 mantissa bits): the logits move, but not by much
    assert 0 < out["max_logit_change"] < 2.0
    assert out["after"]["acc"] > out["before"]["acc"] - 0.2


def test_fp8_with_no_kept_linear_rewrites_all_eleven(trained):
    out = guard(None, fp8_backend("tensorwise", keep=()), TINY, trained=trained)
    assert out["aa_rewrites"] == {"fp8_linear": 11}  # 5 per block and the head
    assert out["rewrite"] == "fp8:tensorwise"


def test_fp8_static_leaves_a_plain_model_alone(trained):
    # scale 1 only fits unit-scaled operands: the pass rewrites nothing in a plain stack
    out = guard(None, "fp8:static", TINY, trained=trained)
    assert out["aa_rewrites"] == {}
    assert out["delta_acc"] == 0.0 and out["max_logit_change"] == 0.0


def test_fp8_static_rewrites_the_umup_adapter(one_thread):
    torch.manual_seed(0)
    model = model_spec("umup").model_for(TINY, 32)
    out = guard(None, "fp8:static", TINY, trained=model)
    # q, k, v, gate and up per block (o_proj, down_proj and lm_head are kept); the rms_norm
    # pass also fires on the two norms per block and the final one
    assert out["aa_rewrites"] == {"fp8_linear": 10, "rms_norm": 5}
    assert out["max_logit_change"] > 0


def test_int8_plan_meets_its_budget_with_int8_layers(trained):
    share = 0.3
    out = guard(None, "int8:0.3", TINY, trained=trained)
    total, shapes = component_bytes(trained)
    levels = out["plan_levels"]
    assert set(levels) == {"int8", "none"} and sum(levels.values()) == len(shapes) == 10
    fn = rewrite_from_spec("int8:0.3")
    assert isinstance(fn, PlanRewrite)
    small = fn(trained, make_data(TINY))
    int8 = [n for n, m in small.named_modules() if isinstance(m, Int8Linear)]
    assert sorted(int8) == sorted(n for n, lv in fn.plan.items() if lv == "int8")
    assert len(int8) == levels["int8"]
    # int8 stores 1 byte per weight plus a float32 scale per output row
    saved = sum(shapes[n][0] * shapes[n][1] * 3 - 4 * shapes[n][0] for n in int8)
    assert saved >= share * total
    # it stops once the budget is met: before its last component it had not met it, so
    # dropping even the largest one leaves less than the budget
    largest = max(shapes[n][0] * shapes[n][1] * 3 - 4 * shapes[n][0] for n in int8)
    assert saved - largest < share * total
    # absmax int8 of a few weights barely moves the logits
    assert out["max_logit_change"] < 0.5
    assert out["after"]["acc"] >= out["before"]["acc"] - 0.1


def test_int8_budget_plan_quantises_everything_at_the_top_share(trained):
    total, shapes = component_bytes(trained)
    most = sum(o * i * 3 - 4 * o for o, i in shapes.values()) / total
    prompts = task_prompts(make_data(TINY), 8, 4)
    plan = int8_budget_plan(trained, prompts, 4, most)
    assert set(plan.values()) == {"int8"}
    with pytest.raises(ValueError, match="more than int8 of every component saves"):
        int8_budget_plan(trained, prompts, 4, most + 0.01)


def test_compile_rewrites_are_named_and_carry_their_options():
    fn = rewrite_from_spec("fp8:rowwise")
    assert isinstance(fn, CompileRewrite)
    assert fn.options["fp8"] == "rowwise" and "out" in fn.options["fp8_keep"]
    assert not fn.autograd and rewrite_from_spec("fp8:static").autograd
    assert rewrite_from_spec("aa:inductor").options == {"inner_compiler": "inductor"}


def test_bad_rewrite_specs_and_guard_inputs():
    with pytest.raises(ValueError, match="fp8 mode"):
        rewrite_from_spec("fp8:fp4")
    with pytest.raises(ValueError, match="fp8 mode"):
        fp8_backend("e4m3")
    with pytest.raises(ValueError, match="keep"):
        fp8_backend(keep="out")
    with pytest.raises(ValueError, match="share of the weight bytes"):
        rewrite_from_spec("int8:half")
    with pytest.raises(ValueError, match="must be in"):
        rewrite_from_spec("int8:0")
    with pytest.raises(ValueError, match="unknown rewrite"):
        rewrite_from_spec("int4:0.5")
    with pytest.raises(TypeError, match="spec is a string"):
        rewrite_from_spec(0.5)
    with pytest.raises(TypeError, match="model_fn"):
        guard(None, "aa", TINY)
    with pytest.raises(ValueError, match="leaves no prompt"):
        task_prompts(make_data(TINY), 4, 8)
