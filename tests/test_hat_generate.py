"""Cached HAT generation (`HATCache`: byte-encoder, word-backbone and byte-decoder KV caches)
against the uncached reference (`generate_bytes(use_cache=False)`, a full forward per byte)
and against teacher-forced forwards, on tiny random-weight models."""

import itertools
from typing import ClassVar

import pytest
import torch

from aa_compile.models.hat import ByteBatch, HATConfig, HATModel
from aa_compile.models.hat import generate as hat_generate
from aa_compile.models.hat import model as hat_model
from aa_compile.models.hat.generate import ByteWindowCache, HATCache
from aa_compile.models.hat.rope import Llama3RopeScaling
from aa_compile.models.transformer import TransformerConfig

ENGLISH = "The quick brown fox jumps over the lazy dog."
GERMAN = "Größenänderungsüberprüfung: Die Straße über'm Fluß."
MIXED = "Hi 日本語のテキスト, Привет 😀👍 ok"
PROMPTS = {"english": ENGLISH, "german": GERMAN, "mixed": MIXED}


def _stack(d=64, layers=1, heads=4, kv=2):
    return TransformerConfig(vocab_size=256, d_model=d, n_layers=layers, n_heads=heads,
                             n_kv_heads=kv, d_ff=2 * d)


CONFIGS = {
    # window 64 >= the prompts: nothing trimmed; max_word_bytes 32
    "tiny": {},
    # two-layer byte stacks, a guide before every decoder layer, a window much smaller than
    # the prompt, words cut at 6 bytes
    "every_layer_w8": {"guide_every_layer": True, "sliding_window": 8, "max_word_bytes": 6,
                       "encoder": _stack(layers=2), "decoder": _stack(layers=2)},
    # one decoder layer guided of two, window 3, 4-byte words, no pooling qk-norm, MHA
    # decoder, one backbone layer
    "first_layer_w3": {"sliding_window": 3, "max_word_bytes": 4, "pool_qk_norm": False,
                       "decoder": _stack(layers=2, kv=4),
                       "backbone": TransformerConfig(vocab_size=1, d_model=96, n_layers=1,
                                                     n_heads=4, n_kv_heads=2, d_ff=192)},
    # the released models' RoPE: pooling keys turned by byte minus word position, and a
    # Llama-3 scaled backbone whose blend band covers these word positions; window 8
    "released_rope_w8": {"pool_rope": True, "sliding_window": 8, "max_word_bytes": 6,
                         "backbone_rope_scaling": Llama3RopeScaling(8.0, 1.0, 4.0, 16)},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is faster than two fighting over a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(config="tiny", seed=0, dtype=torch.float32) -> HATModel:
    torch.manual_seed(seed)
    m = HATModel(HATConfig.tiny(**CONFIGS[config])).to(dtype)
    with torch.no_grad():  # norms away from 1, so a norm the cached path forgets shows
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m.eval()


def steer(m: HATModel, table: dict[int, int], strength: float = 10.0) -> HATModel:
    """Make the model write ``table[b]`` after byte ``b`` (a bigram it cannot miss) while
    every other part keeps its random weights: the alphabet's byte embeddings become large
    orthogonal vectors, and the head's row ``table[b]`` points along ``b``'s embedding."""
    d = m.config.d_enc
    alphabet = sorted(set(table) | set(table.values()))
    assert len(alphabet) <= d
    gen = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    basis = basis.T.to(m.first_word.dtype)
    with torch.no_grad():
        head = m.decoder.lm_head.weight
        for i, b in enumerate(alphabet):
            m.encoder.embed.weight[b] = strength * basis[i]
        for b, nxt in table.items():
            head[nxt] += 0.5 * strength * basis[alphabet.index(b)]
    return m


class Recording(HATCache):
    """A `HATCache` that checks every step's logits against a teacher-forced forward on the
    words it holds at that step (that forward is what the uncached generator computes)."""

    instances: ClassVar[list] = []
    check: ClassVar[bool] = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors: list[float] = []
        Recording.instances.append(self)

    def logits(self):
        got = super().logits()
        if Recording.check:
            want = self.model(ByteBatch.from_words([self.words]))[-1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            self.errors.append(float((got - want).abs().max()))
        return got


@pytest.fixture
def recording(monkeypatch):
    Recording.instances = []
    Recording.check = True
    monkeypatch.setattr(hat_model, "HATCache", Recording)
    return Recording


def both(m, prompt, **kwargs):
    want = m.generate_bytes(prompt, use_cache=False, **kwargs)
    got = m.generate_bytes(prompt, use_cache=True, **kwargs)
    return got, want


# -- generation: cached == uncached ------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("language", PROMPTS)
def test_cached_generation_equals_uncached(config, language, recording):
    m = model(config)
    prompt = PROMPTS[language]
    got, want = both(m, prompt, max_bytes=16)
    assert got == want
    new, words = got
    assert len(new) == 16 and b"".join(words) == prompt.encode() + new
    (cache,) = recording.instances
    assert len(cache.errors) == 16  # the prefill + one step per byte but the last
    window = m.config.sliding_window
    if len(prompt.encode()) > window:  # the window is trimmed: only the last window - 1 kept
        assert len(cache.encoder) == window - 1
        assert len(cache.decoder) <= window - 1 + m.config.max_word_bytes


# the bigram tables steer a random model into valid multi-byte text, where the splitter moves
# bytes of an unfinished character into the next word when the character completes (or when
# the character would pass max_word_bytes)
CJK = {ord(" "): 0xE6, 0xE6: 0x97, 0x97: 0xA5, 0xA5: 0xE6}  # " 旗旗旗..."
EMOJI = {ord(" "): 0xF0, 0xF0: 0x9F, 0x9F: 0x98, 0x98: 0x80, 0x80: 0xF0}  # " 😀😀😀..."


@pytest.mark.parametrize("config, table, prompt", [
    ("tiny", CJK, "Hi "),
    ("every_layer_w8", CJK, "Tokyo: "),
    ("first_layer_w3", CJK, "Ka "),
    ("every_layer_w8", EMOJI, "Straße ha "),
])
def test_cached_generation_rewinds_the_decoder_when_bytes_change_word(config, table, prompt,
                                                                      recording):
    m = steer(model(config), table)
    got, want = both(m, prompt, max_bytes=16)
    assert got == want
    (cache,) = recording.instances
    assert cache.rewinds >= 2 and cache.rewound_bytes >= cache.rewinds, (
        cache.rewinds, got[0])
    new, words = got
    # the steering did write characters, and the words moved their first bytes along
    assert new.decode("utf-8", errors="ignore")
    assert all(len(w) <= m.config.max_word_bytes for w in words)


def test_max_words_and_eos_as_uncached(recording):
    m = steer(model("every_layer_w8"), {ord(" "): ord("a"), ord("a"): ord("b"),
                                        ord("b"): ord(" ")})
    for max_words in (0, 1, 3):
        got, want = both(m, ENGLISH, max_bytes=30, max_words=max_words)
        assert got == want
        new, words = got
        assert len(words) - len(m.splitter.words(ENGLISH)) == max_words and len(new) < 30
    eos = m.config.eos_byte
    m = steer(model("first_layer_w3"), {ord("x"): ord("y"), ord("y"): eos})
    got, want = both(m, "Hallo x", max_bytes=30)
    assert got == want and got[0] == b"y"  # "y", then EOS (not returned)
    assert both(m, "Hallo x", max_bytes=0) == ((b"", m.splitter.words("Hallo x")),) * 2
    assert m.generate("Hallo x") == m.generate("Hallo x", use_cache=False) == "y"


# -- teacher forcing on natural text -----------------------------------------------------------

FORCED = [
    # (config, prompt, forced continuation, dtype, rewinds expected)
    ("tiny", "Tokyo: ", "日本語のテキスト Straße", torch.float32, True),
    ("every_layer_w8", GERMAN, " Größenänderung äöü", torch.float32, True),
    ("first_layer_w3", MIXED, " Пр 😀😀 HTMLParser", torch.float32, True),
    ("every_layer_w8", ENGLISH, " The fox, againAndAgain.", torch.float32, False),
    ("first_layer_w3", GERMAN, " Größe 日本 😀", torch.float64, True),
    ("released_rope_w8", MIXED, " 日本語 Straße, againAndAgain 😀", torch.float32, True),
]


@pytest.mark.parametrize("config, prompt, forced, dtype, rewinds", FORCED,
                         ids=["cjk-tiny", "german-w8", "mixed-w3", "english-w8", "float64-w3",
                              "released-rope-w8"])
def test_cache_logits_equal_teacher_forced_forward(config, prompt, forced, dtype, rewinds,
                                                   monkeypatch):
    """Feed a fixed text byte by byte: at every step the cached logits equal the full forward
    on the same words, and the words are those of the splitter's byte-by-byte rule. A small
    prefill chunk makes the prompt go through several batched passes."""
    monkeypatch.setattr(hat_generate, "PREFILL_CHUNK", 5)
    m = model(config, dtype=dtype)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else \
        {"rtol": 1e-10, "atol": 1e-12}
    words = m.splitter.words(prompt)
    cache = HATCache(m, words)
    for byte in forced.encode():
        want = m(ByteBatch.from_words([words]))[-1]
        torch.testing.assert_close(cache.logits(), want, **tol)
        pieces = cache.append_byte(byte)
        assert pieces == m.splitter.append_byte(words[-1], byte)
        words[-1:] = pieces
        assert cache.words == words
    torch.testing.assert_close(cache.logits(), m(ByteBatch.from_words([words]))[-1], **tol)
    assert (cache.rewinds > 0) == rewinds, (cache.rewinds, words)
    window = m.config.sliding_window
    assert len(cache.encoder) == min(window - 1, len(cache.data))
    assert cache.backbone.length == len(words) - 1


def test_several_bytes_between_logits_calls():
    """Bytes may be appended in bulk: the next `logits` catches up on all of them (one batched
    encoder/decoder pass, one backbone step for every word finished meanwhile)."""
    m = model("every_layer_w8")
    words = m.splitter.words("Hi")
    cache = HATCache(m, words)
    cache.logits()
    data = "日本語のテキスト Größen! 😀".encode()
    cuts = [0, 1, 3, 4, 8, 9, 14, 15, 21, 27, 30, len(data)]  # some inside characters
    for a, b in itertools.pairwise(cuts):
        for byte in data[a:b]:
            words[-1:] = cache.append_byte(byte)
        torch.testing.assert_close(cache.logits(), m(ByteBatch.from_words([words]))[-1],
                                   rtol=1e-4, atol=1e-5)
    assert cache.rewinds > 0


# -- the byte window cache ---------------------------------------------------------------------

def test_byte_window_cache_keeps_what_it_is_asked_to_keep():
    """Random appends, truncations, forgets and shrinks against a plain per-position record;
    the small capacity makes it compact and grow."""
    gen = torch.Generator().manual_seed(0)
    cache = ByteWindowCache(2, 2, 3, torch.float32, "cpu", capacity=4)
    record: dict[int, tuple] = {}
    most = 0
    for _ in range(300):
        op = int(torch.randint(0, 6, (1,), generator=gen))
        if op == 0 and len(cache):
            cache.truncate(int(torch.randint(cache.start, cache.end + 1, (1,), generator=gen)))
        elif op == 1:
            cache.forget_before(cache.end - int(torch.randint(0, 6, (1,), generator=gen)))
        elif op == 2:
            cache.shrink(minimum=4)
        else:
            s = int(torch.randint(1, 7, (1,), generator=gen))
            most = max(most, len(cache) + s)
            cache.reserve(s)
            lo = int(torch.randint(cache.start, cache.end + 1, (1,), generator=gen))
            for layer in range(2):
                k = torch.randn(2, s, 3, generator=gen)
                v = torch.randn(2, s, 3, generator=gen)
                keys, values = cache.write(layer, k, v, lo)
                for j in range(s):
                    record[(layer, cache.end + j)] = (k[:, j], v[:, j])
                want = [record[(layer, p)] for p in range(lo, cache.end + s)]
                assert torch.equal(keys, torch.stack([w[0] for w in want], 1))
                assert torch.equal(values, torch.stack([w[1] for w in want], 1))
            cache.commit(s)
        assert cache.capacity <= max(4, 4 * most)  # memory follows what is kept
    with pytest.raises(RuntimeError, match="truncate"):
        cache.truncate(cache.start - 1)
    with pytest.raises(RuntimeError, match="reserved"):
        cache.write(0, torch.zeros(2, 1, 3), torch.zeros(2, 1, 3), cache.start)


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False])
def test_bad_input_raises_with_and_without_cache(use_cache):
    m = model()
    with pytest.raises(ValueError, match="at least one byte"):
        m.generate_bytes("", use_cache=use_cache)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="max_bytes"):
            m.generate_bytes("a", max_bytes=bad, use_cache=use_cache)
    with pytest.raises(ValueError, match="max_words"):
        m.generate_bytes("a", max_words=-2, use_cache=use_cache)
    with pytest.raises(TypeError, match="prompt"):
        m.generate(b"bytes", use_cache=use_cache)


def test_bad_cache_use_raises():
    m = model()
    with pytest.raises(TypeError, match="use_cache"):
        m.generate_bytes("a", use_cache="yes")
    with pytest.raises(ValueError, match="at least one word"):
        HATCache(m, [])
    with pytest.raises(ValueError, match="non-empty bytes"):
        HATCache(m, [b"a", b""])
    cache = HATCache(m, [b"Hi"])
    with pytest.raises(ValueError, match="byte must be"):
        cache.append_byte(256)
    with pytest.raises(ValueError, match="join to"):
        cache.append_byte(ord("!"), [b"Hi", b"?"])
    assert cache.words == [b"Hi"]  # a rejected byte changes nothing
