"""HATModel: config checks, masks, causality, document isolation, the sliding window, pooling
and guide vector against explicit float64 computations, loss, training, compile, generate."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from aa_compile.models.hat import (
    IGNORE,
    ByteBatch,
    HATConfig,
    HATModel,
    rope_at,
    sliding_window_mask,
)
from aa_compile.models.hat.train import train
from aa_compile.models.transformer import TransformerConfig, rope_tables

TEXTS = ["Hello, world! Grüße aus Köln.", "Zweites Dokument<|eot_id|> über Straßen 😀.",
         "x", "The quick brown fox jumps over the lazy dog, again and again."]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is faster than two fighting over a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(seed=0, dtype=torch.float32, **overrides) -> HATModel:
    torch.manual_seed(seed)
    m = HATModel(HATConfig.tiny(**overrides)).to(dtype)
    with torch.no_grad():  # norms away from 1, so a missing norm weight shows
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


def batch_of(m, texts=TEXTS) -> ByteBatch:
    return m.splitter.encode(texts)


def with_bytes(batch: ByteBatch, data: torch.Tensor) -> ByteBatch:
    """Same words and documents, other byte values."""
    return ByteBatch.from_offsets(data, batch.word_offsets, batch.doc_offsets)


# -- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    ({"sliding_window": 0}, "sliding_window"),
    ({"max_word_bytes": 3}, "max_word_bytes"),
    ({"pool_heads": 5}, "pool_heads=5 must divide"),
    ({"eos_byte": 65}, "eos_byte"),
    ({"decoder": TransformerConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=4)},
     "decoder.d_model=32 must equal encoder.d_model=64"),
    ({"encoder": TransformerConfig(vocab_size=300, d_model=64, n_layers=1, n_heads=4)},
     "encoder.vocab_size must be 256"),
])
def test_bad_config_raises_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        HATConfig.tiny(**overrides)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="TransformerConfig"):
        HATConfig.tiny(backbone={"d_model": 96})
    with pytest.raises(TypeError, match="pool_qk_norm"):
        HATConfig.tiny(pool_qk_norm=1)
    with pytest.raises(TypeError, match="HATConfig"):
        HATModel(TransformerConfig())
    m = model()
    with pytest.raises(TypeError, match="ByteBatch"):
        m(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="no bytes"):
        m(m.splitter.encode(""))


def test_default_config_and_parameter_count():
    cfg = HATConfig()
    assert (cfg.sliding_window, cfg.max_word_bytes, cfg.eos_byte) == (768, 100, 192)
    m = model()
    counts = m.num_parameters()
    assert counts["total"] == sum(p.numel() for p in m.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


# -- building blocks --------------------------------------------------------------------------

def test_rope_at_equals_rope_tables():
    cos, sin = rope_tables(16, 50, 10000.0)
    cos2, sin2 = rope_at(torch.arange(50), 16, 10000.0)
    assert torch.equal(cos, cos2) and torch.equal(sin, sin2)


@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=4), window=st.integers(1, 6))
def test_sliding_window_mask_matches_its_definition(lengths, window):
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])
    mask = sliding_window_mask(doc, pos, window)
    for i in range(len(doc)):
        for j in range(len(doc)):
            same = doc[i] == doc[j]
            want = bool(same and 0 <= i - j < window)
            assert bool(mask[i, j]) == want
        assert mask[i, i]  # no empty rows
    assert mask.sum() == sum(min(p + 1, window) for n in lengths for p in range(n))


def test_pooling_equals_a_per_word_loop_in_float64():
    m = model(dtype=torch.float64)
    b = batch_of(m)
    h = torch.randn(b.n_bytes, m.config.d_enc, dtype=torch.float64)
    got = m.pooling(h, b.word_bytes, b.word_mask)
    p = m.pooling
    n_heads, hd = p.n_heads, p.head_dim

    def head_norm(x, norm):  # per-head RMSNorm, normalized in float32 (the Llama definition)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
        return norm.weight * h.to(x.dtype)

    q = head_norm((p.q_proj.weight @ p.latent_query).view(n_heads, hd), p.q_norm)
    for w in range(b.n_words):
        a, e = b.word_offsets[w : w + 2].tolist()
        keys = h[a:e]
        k = head_norm((keys @ p.k_proj.weight.T).view(-1, n_heads, hd), p.k_norm)
        v = (keys @ p.v_proj.weight.T).view(-1, n_heads, hd)
        heads = []
        for head in range(n_heads):
            scores = k[:, head] @ q[head] / math.sqrt(hd)
            heads.append(torch.softmax(scores, 0) @ v[:, head])
        want = p.o_proj.weight @ torch.cat(heads)
        torch.testing.assert_close(got[w], want, rtol=1e-10, atol=1e-12)


def test_guide_add_equals_cross_attention_with_one_key_in_float64():
    """Any q_proj / k_proj / query norm: the softmax over a single key is 1."""
    m = model(dtype=torch.float64)
    b = batch_of(m)
    g = m.decoder.guides[0]
    cfg = m.config.decoder
    n_heads, kv_heads, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    x = torch.randn(b.n_bytes, cfg.d_model, dtype=torch.float64)  # decoder byte states
    pred = torch.randn(b.n_words, m.config.d_backbone, dtype=torch.float64)
    q_proj = torch.randn(n_heads * hd, cfg.d_model, dtype=torch.float64)
    k_proj = torch.randn(kv_heads * hd, m.config.d_backbone, dtype=torch.float64)
    kv = g.kv_norm(pred)[b.byte_word]  # each byte's single key/value source
    q = (F.rms_norm(x, (cfg.d_model,)) @ q_proj.T).view(-1, n_heads, 1, hd)
    k = (kv @ k_proj.T).view(-1, kv_heads, 1, hd).repeat_interleave(n_heads // kv_heads, 1)
    v = (kv @ g.v_proj.weight.T).view(-1, kv_heads, 1, hd)
    v = v.repeat_interleave(n_heads // kv_heads, 1)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # [T, H, 1, 1]
    assert torch.equal(attn, torch.ones_like(attn))
    want = x + (attn @ v).flatten(1) @ g.o_proj.weight.T
    got = x + g(pred)[b.byte_word]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_predict_words_equals_running_the_backbone_per_document():
    m = model()
    b = batch_of(m)
    words = torch.randn(b.n_words, m.config.d_backbone)
    got = m.predict_words(words, b)
    for d in range(b.n_docs):
        a, e = b.doc_offsets[d : d + 2].tolist()
        if a == e:
            continue
        x = words[a:e][None]
        cos, sin = rope_tables(m.config.backbone.head_dim, e - a, m.config.backbone.rope_theta)
        for block in m.backbone:
            x = block(x, cos, sin)
        assert torch.equal(got[a], m.first_word)  # the first word's prediction is learned
        torch.testing.assert_close(got[a + 1 : e], x[0, :-1], rtol=1e-5, atol=1e-6)


# -- causality and isolation ------------------------------------------------------------------

@pytest.mark.parametrize("every_layer", [False, True])
def test_future_bytes_do_not_change_earlier_logits(every_layer):
    m = model(guide_every_layer=every_layer, decoder=TransformerConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128))
    b = batch_of(m, TEXTS[-1:])
    logits = m(b)
    gen = torch.Generator().manual_seed(1)
    for t in (3, 17, b.n_bytes // 2, b.n_bytes - 1):
        data = b.bytes.clone()
        data[t] = (data[t] + torch.randint(1, 256, (1,), generator=gen)) % 256
        changed = m(with_bytes(b, data))
        torch.testing.assert_close(changed[:t], logits[:t], rtol=0, atol=1e-6)
        assert not torch.allclose(changed[t], logits[t])  # the test can see a change


def test_other_documents_do_not_change_this_ones_logits():
    m = model()
    alone = m(batch_of(m, [TEXTS[0]]))
    for others in (TEXTS[1:], [TEXTS[3], TEXTS[1]], ["y" * 300]):
        for first in (True, False):
            texts = [TEXTS[0], *others] if first else [*others, TEXTS[0]]
            b = batch_of(m, texts)
            d = 0 if first else len(others)
            a, e = b.doc_byte_offsets()[d : d + 2].tolist()
            torch.testing.assert_close(m(b)[a:e], alone, rtol=1e-5, atol=1e-5)


def test_sliding_window_bounds_the_reach_without_the_backbone_path():
    """1-layer encoder + 1-layer decoder, window w: byte j reaches logits j .. j + 2(w - 1) and
    no further, once the guide vector (the only backbone path) is zeroed; with the guide on,
    it reaches further through pooling and the backbone."""
    window = 6
    m = model(sliding_window=window)
    assert m.config.encoder.n_layers == m.config.decoder.n_layers == 1
    b = batch_of(m, [TEXTS[3]])
    j = 5
    data = b.bytes.clone()
    data[j] = (data[j] + 77) % 256
    reach = 2 * (window - 1)

    def changed_positions(net):
        diff = (net(with_bytes(b, data)) - net(b)).abs().amax(-1)
        return set(torch.nonzero(diff > 1e-6).flatten().tolist())

    assert max(changed_positions(m)) > j + reach  # through pooling -> backbone -> guide
    with torch.no_grad():
        m.decoder.guides[0].o_proj.weight.zero_()
    assert changed_positions(m) == set(range(j, j + reach + 1))


@settings(max_examples=8)
@given(seed=st.integers(0, 2**16), cut=st.integers(1, 40))
def test_loss_is_next_byte_cross_entropy_within_documents(seed, cut):
    m = model(seed=seed % 3)
    text = TEXTS[3]
    b = batch_of(m, [text[:cut], text[cut:], "ab"])
    logits = m(b)
    terms = []
    for d in range(b.n_docs):
        a, e = b.doc_byte_offsets()[d : d + 2].tolist()
        for t in range(a, e - 1):  # byte t predicts byte t + 1; the document's last predicts none
            terms.append(F.cross_entropy(logits[t], b.bytes[t + 1]))
    assert (b.targets != IGNORE).sum() == len(terms)
    torch.testing.assert_close(m.loss(b), torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


def test_loss_is_zero_when_nothing_is_predicted():
    m = model()
    assert m.loss(batch_of(m, ["a", "b"])) == 0


# -- training and gradients -------------------------------------------------------------------

@pytest.mark.parametrize("every_layer", [False, True])
def test_gradients_reach_every_parameter(every_layer):
    m = model(guide_every_layer=every_layer, decoder=TransformerConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128))
    m.loss(batch_of(m)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_short_training_run_reduces_the_loss():
    result = train(steps=40, docs=4, window=64, lr=3e-3, seed=0, progress=False)
    assert len(result.losses) == 40 and all(math.isfinite(x) for x in result.losses)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert first > 5.0  # about ln(256) = 5.55 at the start
    assert last < first - 1.0, result.losses


def _loss_and_grads(m, loss_fn, b):
    m.zero_grad(set_to_none=True)
    loss = loss_fn(b)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def test_aa_backend_loss_and_gradients_equal_eager():
    import aa_compile

    m = model()
    b = batch_of(m)
    compiled = torch.compile(m.loss, backend="aa", options={"inner_compiler": "eager"})
    loss_c, grads_c = _loss_and_grads(m, compiled, b)
    rep = aa_compile.last_report()
    assert len(rep.graphs) == 1  # no graph break: the whole loss is one graph
    assert rep.rewrites["rms_norm"] > 0  # the pass fired
    loss_e, grads_e = _loss_and_grads(m, m.loss, b)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aa", "inductor"])
def test_inductor_compiled_loss_equals_eager(backend):
    """Forward only: a backward compile of this graph takes minutes on two shared cores."""
    m = model()
    b = batch_of(m)
    with torch.no_grad():
        want = m.loss(b)
        got = torch.compile(m.loss, backend=backend)(b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- generation -------------------------------------------------------------------------------

def ascii_only(m: HATModel) -> HATModel:
    """Rows 128..255 of the head copy row 0, so argmax (first maximum) is always < 128."""
    with torch.no_grad():
        m.decoder.lm_head.weight[128:] = m.decoder.lm_head.weight[0]
    return m


def test_generate_equals_teacher_forcing_on_its_own_words():
    m = ascii_only(model())
    prompt = "Die Straße ist"
    new, words = m.generate_bytes(prompt, max_bytes=24)
    assert len(new) == 24 and max(new) < 128
    assert b"".join(words) == prompt.encode() + new
    assert words == m.splitter.words((prompt.encode() + new).decode())  # ASCII: same words
    logits = m(ByteBatch.from_words([words]))
    start = len(prompt.encode())
    assert logits[start - 1 : -1].argmax(-1).tolist() == list(new)


def test_generate_returns_str_and_respects_max_bytes_and_max_words():
    m = model()
    out = m.generate("Hallo Welt", max_bytes=7)
    assert isinstance(out, str) and len(m.generate_bytes("Hallo Welt", max_bytes=7)[0]) <= 7
    assert m.generate("Hallo", max_bytes=0) == ""
    m = ascii_only(m)
    for max_words in (0, 1, 3):
        new, words = m.generate_bytes("Hallo", max_bytes=60, max_words=max_words)
        assert len(words) - len(m.splitter.words("Hallo")) <= max_words
        if len(new) < 60:  # stopped by max_words: the next byte would have begun a new word
            assert len(words) - 1 == max_words


def test_generate_stops_at_eos(monkeypatch):
    m = model()
    calls = []

    def fake_forward(batch):
        calls.append(batch.n_bytes)
        logits = torch.zeros(batch.n_bytes, 256)
        logits[:, 192 if len(calls) == 4 else ord("a")] = 1.0
        return logits

    monkeypatch.setattr(m, "forward", fake_forward)  # the uncached path calls forward
    assert m.generate("Hi", max_bytes=50, use_cache=False) == "aaa"
    assert calls == [2, 3, 4, 5]


def test_generate_bad_input():
    m = model()
    with pytest.raises(TypeError, match="prompt"):
        m.generate(b"bytes")
    with pytest.raises(ValueError, match="at least one byte"):
        m.generate("")
    with pytest.raises(ValueError, match="max_bytes"):
        m.generate("a", max_bytes=-1)
    with pytest.raises(ValueError, match="max_words"):
        m.generate("a", max_words=1.5)


def test_float64_model_runs():
    m = model(dtype=torch.float64)
    assert m(batch_of(m)).dtype == torch.float64
    assert dataclasses.is_dataclass(batch_of(m))


# -- the released models' RoPE: pooling RoPE and Llama-3 scaling ------------------------------

def test_pooling_rope_equals_rotating_query_at_word_and_keys_at_byte_positions():
    """``pool_rope``: a per-word loop in float64 that rotates the query at the word's position
    and each key at its byte's position (how the released connector computes it) equals the
    model's pooling, which turns only the keys, by byte position minus word position."""
    m = model(dtype=torch.float64, pool_rope=True)
    b = batch_of(m)
    h = torch.randn(b.n_bytes, m.config.d_enc, dtype=torch.float64)
    key_pos = b.byte_pos - b.word_pos[b.byte_word]
    got = m.pooling(h, b.word_bytes, b.word_mask, key_pos)
    p = m.pooling
    n_heads, hd = p.n_heads, p.head_dim
    inv = 1.0 / m.config.encoder.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def rotate(x, pos):  # x [..., hd] at integer position pos: rotate-half pairs
        c, s = torch.cos(pos * inv), torch.sin(pos * inv)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def head_norm(x, norm):
        return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)

    q0 = head_norm((p.q_proj.weight @ p.latent_query).view(n_heads, hd), p.q_norm)
    assert b.word_pos.max() > 3  # later words sit far from position 0
    for w in range(b.n_words):
        a, e = b.word_offsets[w : w + 2].tolist()
        q = rotate(q0, int(b.word_pos[w]))
        k = head_norm((h[a:e] @ p.k_proj.weight.T).view(-1, n_heads, hd), p.k_norm)
        k = torch.stack([rotate(k[i], int(b.byte_pos[a + i])) for i in range(e - a)])
        v = (h[a:e] @ p.v_proj.weight.T).view(-1, n_heads, hd)
        heads = [torch.softmax(k[:, j] @ q[j] / math.sqrt(hd), 0) @ v[:, j]
                 for j in range(n_heads)]
        want = p.o_proj.weight @ torch.cat(heads)
        # cos/sin come from float32 angles; everything else is float64
        torch.testing.assert_close(got[w], want, rtol=1e-5, atol=1e-6)
    no_rope = model(dtype=torch.float64).pooling(h, b.word_bytes, b.word_mask)
    assert (no_rope - got).abs().max() > 1e-3  # the rotation matters


def test_pooling_rope_needs_key_positions_exactly_when_on():
    b = batch_of(model())
    h = torch.randn(b.n_bytes, 64)
    with pytest.raises(ValueError, match="key_pos must be given exactly when"):
        model(pool_rope=True).pooling(h, b.word_bytes, b.word_mask)
    with pytest.raises(ValueError, match="key_pos must be given exactly when"):
        model().pooling(h, b.word_bytes, b.word_mask, b.byte_pos)


def _llama3_by_hand(head_dim, theta, factor, low, high, original):
    """Llama-3 scaled inverse frequencies, element by element: short wavelengths (below
    original / high) keep their frequency, long ones (above original / low) are divided by
    factor, those between mix the two linearly in original / wavelength."""
    out = []
    for i in range(0, head_dim, 2):
        f = theta ** (-i / head_dim)
        wavelength = 2 * math.pi / f
        if wavelength < original / high:
            out.append(f)
        elif wavelength > original / low:
            out.append(f / factor)
        else:
            s = (original / wavelength - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_dim, theta, original", [(128, 500000.0, 8192), (12, 500000.0, 64),
                                                       (16, 10000.0, 100)])
def test_llama3_inv_freq_equals_the_rule_by_hand(head_dim, theta, original):
    from aa_compile.models.hat.rope import Llama3RopeScaling, rope_inv_freq

    scaling = Llama3RopeScaling(8.0, 1.0, 4.0, original)
    got = rope_inv_freq(head_dim, theta, scaling)
    want = _llama3_by_hand(head_dim, theta, 8.0, 1.0, 4.0, original)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    plain = rope_inv_freq(head_dim, theta)
    assert got[0] == plain[0]  # the fastest rotation is kept
    torch.testing.assert_close(got[-1], plain[-1] / 8)  # the slowest is 8 times slower
    cos, sin = rope_at(torch.tensor([0, 5, 1000]), head_dim, theta, scaling)
    angles = torch.tensor([0.0, 5.0, 1000.0], dtype=torch.float64)[:, None] * want
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-4)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-4)


def test_llama31_mid_band_frequency_by_hand():
    """Llama-3.1's scaling (factor 8, bands 1 and 4, 8192 positions, theta 500000, head size
    128): pair 32 has frequency 500000^-1/2 = 1/707.107, wavelength 4442.9, inside the blend;
    mix = (8192 / 4442.9 - 1) / 3 = 0.28129, frequency (0.71871 / 8 + 0.28129) / 707.107 =
    5.2485e-4."""
    from aa_compile.models.hat.rope import Llama3RopeScaling, rope_inv_freq

    got = rope_inv_freq(128, 500000.0, Llama3RopeScaling(8.0, 1.0, 4.0, 8192))
    assert abs(float(got[32]) - 5.2485e-4) < 1e-8


def test_backbone_rope_scaling_changes_only_the_backbone_and_generation_agrees():
    from aa_compile.models.hat.rope import Llama3RopeScaling

    scaling = Llama3RopeScaling(8.0, 1.0, 4.0, 16)
    plain, scaled = model(), model(backbone_rope_scaling=scaling)
    scaled.load_state_dict(plain.state_dict())
    b = batch_of(plain)
    with torch.no_grad():
        assert (plain(b) - scaled(b)).abs().max() > 1e-4
    assert scaled.generate_bytes("Hello there, you", max_bytes=12) == \
        scaled.generate_bytes("Hello there, you", max_bytes=12, use_cache=False)


@pytest.mark.parametrize("fields, match", [
    ((0.0, 1.0, 4.0, 8192), "factor must be a number > 0"),
    ((True, 1.0, 4.0, 8192), "factor must be a number > 0"),
    ((8.0, float("nan"), 4.0, 8192), "low_freq_factor must be a number > 0"),
    ((8.0, 4.0, 4.0, 8192), "high_freq_factor=4.0 must be larger than low_freq_factor=4.0"),
    ((8.0, 1.0, 4.0, 0), "original_max_position_embeddings must be an int >= 1"),
    ((8.0, 1.0, 4.0, 8192.0), "original_max_position_embeddings must be an int >= 1"),
])
def test_llama3_scaling_bad_fields(fields, match):
    from aa_compile.models.hat.rope import Llama3RopeScaling

    with pytest.raises(ValueError, match=match):
        Llama3RopeScaling(*fields)


def test_llama3_scaling_from_hf_and_config_types():
    from aa_compile.models.hat.rope import Llama3RopeScaling

    raw = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    scaling = Llama3RopeScaling.from_hf(raw)
    assert scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192) and scaling.to_hf() == raw
    old_key = {("type" if k == "rope_type" else k): v for k, v in raw.items()}
    assert Llama3RopeScaling.from_hf(old_key) == scaling
    with pytest.raises(ValueError, match="type 'linear' is not supported"):
        Llama3RopeScaling.from_hf({**raw, "rope_type": "linear"})
    with pytest.raises(ValueError, match="lacks high_freq_factor"):
        Llama3RopeScaling.from_hf({k: v for k, v in raw.items() if k != "high_freq_factor"})
    with pytest.raises(ValueError, match="must be an object"):
        Llama3RopeScaling.from_hf([8.0])
    # HATConfig takes the dataclass or its fields as a dict (how a saved JSON config holds it)
    cfg = HATConfig.tiny(backbone_rope_scaling=dataclasses.asdict(scaling))
    assert cfg.backbone_rope_scaling == scaling
    with pytest.raises(TypeError, match="backbone_rope_scaling must be None or a"):
        HATConfig.tiny(backbone_rope_scaling=8.0)
    with pytest.raises(TypeError, match="pool_rope must be a bool"):
        HATConfig.tiny(pool_rope=1)


def test_saved_model_keeps_pool_rope_and_backbone_scaling(tmp_path):
    """The aa-compile model format (JSON config) restores both settings."""
    from aa_compile.models import checkpoint
    from aa_compile.models.hat.rope import Llama3RopeScaling

    m = model(pool_rope=True, backbone_rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 16))
    checkpoint.save_model(m, tmp_path / "m")
    again = checkpoint.load_model(tmp_path / "m")
    assert again.config == m.config and again.config.pool_rope
    b = batch_of(m)
    with torch.no_grad():
        assert torch.equal(again(b), m(b))
