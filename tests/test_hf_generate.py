"""The README's recipe for Hugging Face ``generate``: compile ``model.forward``, not the model.

``torch.compile(model).generate(...)`` compiles nothing, because ``generate`` is not the compiled
``forward``. Compiling the bound ``forward`` gives the same greedy tokens as eager, and after the
warm-up graphs (prefill; the first decode step; the decode step once dynamo has seen the KV
length change and made it dynamic) longer generations compile nothing new.
"""

import pytest
import torch
from torch._dynamo.utils import counters

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_compiled_forward_generates_eager_tokens_without_recompiling_per_step():
    import aa_compile

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=12, do_sample=False)
        counters.clear()
        model.forward = torch.compile(model.forward, backend="aa")
        compiled = model.generate(ids, max_new_tokens=12, do_sample=False)
        warm_graphs = counters["stats"]["unique_graphs"]
        longer = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(compiled, eager)
    assert 1 <= warm_graphs <= 3, warm_graphs
    assert counters["stats"]["unique_graphs"] == warm_graphs, "a decode step recompiled"
    assert torch.equal(longer[:, : eager.shape[1]], eager)
    assert aa_compile.last_report().rewrites.get("rms_norm", 0) > 0, "the aa passes did not run"


def test_compiling_the_module_does_not_compile_generate():
    """The pitfall the recipe avoids: ``torch.compile(model).generate`` runs eagerly."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    counters.clear()
    with torch.no_grad():
        torch.compile(model, backend="aa").generate(ids, max_new_tokens=3, do_sample=False)
    assert counters["stats"]["unique_graphs"] == 0
