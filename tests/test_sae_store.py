"""Sites, the activation store, the local concepts, the tiny base LM and SAE training."""

from __future__ import annotations

import pytest
import torch

from aa_compile.models.sae import SparseAutoencoder
from aa_compile.models.transformer import Transformer, TransformerConfig
from aa_compile.sae import (
    ActivationStore,
    TrainConfig,
    available_sites,
    balanced_tokens,
    collect_activations,
    concept_batches,
    concept_windows,
    sae_config_for,
    train_sae,
)
from aa_compile.sae.base_lm import load_base_lm, save_base_lm, train_base_lm
from aa_compile.sae.concepts import byte_labels, split_documents

TINY = TransformerConfig(vocab_size=256, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                         max_seq_len=64)


@pytest.fixture(scope="module")
def tiny_lm() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY).eval()


def _hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_sites_of_reference_and_hf_models(tiny_lm):
    assert available_sites(tiny_lm) == ["block.0", "mlp.0", "block.1", "mlp.1"]
    assert available_sites(_hf_llama()) == ["block.0", "mlp.0", "block.1", "mlp.1"]
    with pytest.raises(ValueError, match="no decoder layers"):
        available_sites(torch.nn.Linear(2, 2))


def _batches(n: int = 3, seq: int = 8, concepts: int = 2):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (2, seq), generator=gen),
             (torch.rand(2, seq, concepts, generator=gen) > 0.5).float()) for _ in range(n)]


def test_store_holds_the_block_and_mlp_outputs(tiny_lm, tmp_path):
    batches = _batches()
    block = collect_activations(tiny_lm, batches, "block.0", tmp_path / "b", concepts=["a", "b"],
                                shard_tokens=20, show_progress=False)
    mlp = collect_activations(tiny_lm, batches, "mlp.0", tmp_path / "m", concepts=["a", "b"],
                              show_progress=False)
    assert len(block.shards) == 2 and len(block) == 48 and block.width == 16
    acts, labels, ids = block.load()
    mlp_acts = mlp.load()[0]
    layer = tiny_lm.layers[0]
    cos, sin = tiny_lm.rope_cos[:8], tiny_lm.rope_sin[:8]
    expected_block, expected_mlp = [], []
    with torch.no_grad():
        for tokens, _ in batches:  # restated: embed, attention, residual, MLP, residual
            x = tiny_lm.embed(tokens)
            h = x + layer.attn(layer.attn_norm(x), cos, sin)
            m = layer.mlp(layer.mlp_norm(h))
            expected_block.append((h + m).reshape(-1, 16))
            expected_mlp.append(m.reshape(-1, 16))
    torch.testing.assert_close(acts, torch.cat(expected_block))
    torch.testing.assert_close(mlp_acts, torch.cat(expected_mlp))
    torch.testing.assert_close(labels, torch.cat([b[1].reshape(-1, 2) for b in batches]))
    torch.testing.assert_close(ids, torch.cat([b[0].reshape(-1) for b in batches]))
    reopened = ActivationStore(tmp_path / "b")
    rows = torch.cat([a for a, _ in reopened.batches(7, seed=3)])
    assert rows.shape == acts.shape
    assert torch.equal(rows.sum(0).round(decimals=3), acts.sum(0).round(decimals=3))


def test_store_reads_hf_decoder_layers(tmp_path):
    model = _hf_llama()
    batches = _batches(n=1, concepts=1)
    store = collect_activations(model, batches, "block.0", tmp_path, concepts=["c"],
                                show_progress=False)
    with torch.no_grad():
        hidden = model(batches[0][0], output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(store.load()[0], hidden.reshape(-1, 16))


def test_store_bad_inputs(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="unknown site 'block.9'; valid sites: block.0, mlp.0"):
        collect_activations(tiny_lm, _batches(), "block.9", tmp_path, concepts=["a", "b"])
    with pytest.raises(ValueError, match="labels must be \\[batch, seq, concepts=1\\]"):
        collect_activations(tiny_lm, _batches(), "block.0", tmp_path, concepts=["a"],
                            show_progress=False)
    with pytest.raises(ValueError, match="got no batches"):
        collect_activations(tiny_lm, [], "block.0", tmp_path, show_progress=False)
    with pytest.raises(FileNotFoundError, match="no activation store"):
        ActivationStore(tmp_path / "nothing")
    broken = Transformer(TINY).eval()
    with torch.no_grad():
        broken.embed.weight[3] = float("nan")
    ids = torch.full((1, 4), 3)
    with pytest.raises(ValueError, match="NaN/inf"):
        collect_activations(broken, [(ids, torch.zeros(1, 4, 0))], "block.0", tmp_path,
                            show_progress=False)


# -- concepts --------------------------------------------------------------------------------


def test_byte_labels_hand_checked():
    expected = torch.tensor([[1, 0, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(byte_labels(b"Ab1 ", True), expected)
    assert byte_labels(b"Q", False).tolist() == [[0.0, 0.0, 1.0]]


def test_splits_are_disjoint_and_cover_the_corpus():
    from aa_compile.data import documents

    for language in ("en", "de"):
        train, test = split_documents(language, "train"), split_documents(language, "test")
        assert train and test and not set(train) & set(test)
        assert sorted(train + test) == sorted(documents(language))
    with pytest.raises(ValueError, match="split must be one of"):
        split_documents("en", "dev")


def test_concept_windows():
    w = concept_windows("test", n_windows=9, seq_len=16, seed=1)
    assert w.ids.shape == (9, 16) and w.labels.shape == (9, 16, 3)
    assert w.window_labels("german").tolist() == [0] * 5 + [1] * 4
    flat = w.labels.reshape(-1, 3)
    torch.testing.assert_close(flat[:, 1], ((w.ids >= 48) & (w.ids <= 57)).float().reshape(-1))
    with pytest.raises(ValueError, match="must be > 0"):
        concept_windows(n_windows=0)
    batches = list(concept_batches(w, 4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]


def test_balanced_tokens():
    labels = torch.tensor([[1.0], [0.0], [0.0], [1.0], [0.0], [0.0]])
    idx = balanced_tokens(labels, 0, 5)
    assert sorted(labels[idx, 0].tolist()) == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="concept 1 in range"):
        balanced_tokens(labels, 1, 5)


def test_base_lm_trains_and_round_trips(tmp_path):
    model, losses = train_base_lm(TINY, steps=4, batch=2, seq=16, show_progress=False)
    assert len(losses) == 4 and all(l == l for l in losses)
    save_base_lm(model, tmp_path / "lm.safetensors")
    back = load_base_lm(tmp_path / "lm.safetensors")
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(back(ids), model(ids))
    with pytest.raises(ValueError, match="safetensors"):
        load_base_lm(tmp_path / "lm.pt")


# -- training --------------------------------------------------------------------------------


def _synthetic(n: int = 1024, d: int = 16, seed: int = 0):
    """Gaussian activations plus a concept direction on the labelled tokens."""
    directions = torch.randn(2, d, generator=torch.Generator().manual_seed(123))
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, 2, generator=gen) > 0.7).float()
    acts = torch.randn(n, d, generator=gen) + 3 * labels @ directions
    return acts, labels


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    pos, neg = scores[labels > 0], scores[labels == 0]
    return float((pos[:, None] > neg[None, :]).float().mean())


def test_gsae_training_conditions_one_latent_per_concept():
    acts, labels = _synthetic(n=512)
    torch.manual_seed(0)
    sae = SparseAutoencoder(sae_config_for("gsae", 16, 64, 8, 2))
    history = train_sae((acts, labels), sae, "gsae", TrainConfig(epochs=8, batch_size=64,
                                                                 lr=3e-3), show_progress=False)
    assert history[-1]["mse"] < 0.5 * history[0]["mse"]
    assert history[-1]["concept"] < 0.8 * history[0]["concept"]
    test_acts, test_labels = _synthetic(seed=1)
    with torch.no_grad():
        pre = sae(test_acts).pre_acts
    for c in range(2):
        assert _auroc(pre[:, c], test_labels[:, c]) > 0.8  # an unconditioned latent: ~0.5


def test_vanilla_training_ignores_labels_and_tracks_dead_latents():
    acts, labels = _synthetic(n=256)
    torch.manual_seed(0)
    sae = SparseAutoencoder(sae_config_for("vanilla", 16, 64, 4, 2))
    history = train_sae((acts, labels), sae, "vanilla",
                        TrainConfig(epochs=3, batch_size=64, dead_after=64), show_progress=False)
    assert all(h["concept"] == 0.0 for h in history)
    assert any(h["auxk"] > 0 for h in history)


def test_training_bad_inputs():
    acts, labels = _synthetic(n=32)
    sae = SparseAutoencoder(sae_config_for("scar", 16, 32, 4, 2))
    with pytest.raises(ValueError, match="reserves n_concepts=1"):
        train_sae((acts, labels), sae, "gsae", show_progress=False)
    with pytest.raises(ValueError, match="width mismatch"):
        train_sae((acts[:, :8], labels), sae, "scar", show_progress=False)
    with pytest.raises(ValueError, match="labels must be \\[tokens=32"):
        train_sae((acts, labels[:5]), sae, "scar", show_progress=False)
    bad = acts.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        train_sae((bad, labels), sae, "scar", show_progress=False)
    with pytest.raises(ValueError, match="kind must be one of"):
        train_sae((acts, labels), sae, "sparse", show_progress=False)
    with pytest.raises(ValueError, match="must be > 0"):
        TrainConfig(epochs=0)
