"""The six MAD token tasks (arXiv 2403.17844) as seeded numpy generators.

Each generator draws one example from a ``numpy.random.Generator`` and returns ``(inputs,
targets)`` as int64 arrays of equal length; ``IGNORE`` (-100) marks a target the loss and the
metric skip. The rules follow the public generators of ``mad-lab`` (special tokens at the top of
the vocabulary, recall tasks train on the full next-token stream and test on the probed values
only), with their known defects fixed: selective copying draws its blank positions from the
passed generator, not numpy's global one, and compression returns the noise-masked targets it
builds. ``docs/mad.md`` lists every rule and every difference.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

IGNORE = -100


def _check_int(name: str, value: int, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_fraction(name: str, value: float, high_open: bool = True) -> None:
    ok = 0.0 <= value < 1.0 if high_open else 0.0 <= value <= 1.0
    if not ok:
        bound = "< 1" if high_open else "<= 1"
        raise ValueError(f"{name} must be >= 0 and {bound}, got {value!r}")


def recall_vocab(vocab_size: int, noise_vocab_size: int, multi_query: bool) -> tuple[int, int]:
    """(number of keys, number of plain tokens) of (noisy) in-context recall: keys are
    ``[0, n_keys)``, values ``[n_keys, n_plain)``, noise ``[n_plain, n_plain + noise)``."""
    n_plain = (vocab_size if multi_query else vocab_size - 1) - noise_vocab_size
    return n_plain // 2, n_plain


def in_context_recall(rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 128,
                      is_training: bool = True, multi_query: bool = True,
                      noise_vocab_size: int = 0, frac_noise: float = 0.0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Key-value pairs whose value is fixed per key within a sequence, then a probe pair.

    ``seq_len // 2 - 1`` slots each hold a (key, value) pair or, with probability
    ``frac_noise``, two noise tokens (one slot, drawn up front, is never noise). The last pair
    probes a key already presented. Multi-query: every value whose key was seen before is a
    test target; otherwise a copy-prefix token ``vocab_size - 1`` precedes the probe, and only
    the probe's value is one. Training targets are the next tokens (every position counts).
    """
    _check_int("seq_len", seq_len, 4)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (key-value pairs), got {seq_len}")
    _check_fraction("frac_noise", frac_noise)
    n_keys, n_plain = recall_vocab(vocab_size, noise_vocab_size, multi_query)
    if n_keys < 1 or n_plain - n_keys < 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no keys or values after "
                         f"noise_vocab_size={noise_vocab_size} and the special token")
    if frac_noise > 0 and noise_vocab_size < 1:
        raise ValueError("noise_vocab_size must be >= 1 when frac_noise > 0")
    n_slots = seq_len // 2
    never_noise = int(rng.integers(n_slots))
    kv: dict[int, int] = {}
    inputs: list[int] = []
    targets: list[int] = []
    for slot in range(n_slots - 1):
        if frac_noise > 0 and slot != never_noise and rng.random() < frac_noise:
            inputs += [int(t) for t in rng.integers(n_plain, n_plain + noise_vocab_size, 2)]
            targets += [IGNORE, IGNORE]
            continue
        k = int(rng.integers(n_keys))
        seen = k in kv
        if not seen:
            kv[k] = int(rng.integers(n_keys, n_plain))
        inputs += [k, kv[k]]
        targets += [IGNORE, kv[k] if seen and multi_query else IGNORE]
    presented = list(kv)
    if not presented:  # every slot was noise: possible only when never_noise is the last slot
        k = int(rng.integers(n_keys))
        kv[k] = int(rng.integers(n_keys, n_plain))
        inputs[-2:] = [k, kv[k]]
        presented = [k]
    k_probe = presented[int(rng.integers(len(presented)))]
    if not multi_query:
        inputs.append(vocab_size - 1)
        targets.append(IGNORE)
    inputs += [k_probe, kv[k_probe]]
    targets += [IGNORE, kv[k_probe]]
    x, y = np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    return (x[:-1], x[1:]) if is_training else (x[:-1], y[1:])


def noisy_in_context_recall(rng: np.random.Generator, vocab_size: int = 32, seq_len: int = 128,
                            noise_vocab_size: int = 16, frac_noise: float = 0.2,
                            is_training: bool = True, multi_query: bool = True
                            ) -> tuple[np.ndarray, np.ndarray]:
    """In-context recall with noise-token pairs (`in_context_recall` with ``frac_noise > 0``)."""
    return in_context_recall(rng, vocab_size, seq_len, is_training, multi_query,
                             noise_vocab_size, frac_noise)


def _motif(rng: np.random.Generator, first: int, n_tokens: int, size: int) -> tuple[int, ...]:
    """A uniform ordered ``size``-tuple of distinct tokens of ``[first, first + n_tokens)``.

    The public code shuffles the list of all such tuples and picks one; drawing one directly has
    the same distribution without building ``n_tokens ** size`` tuples per example.
    """
    return tuple(int(first + t) for t in rng.permutation(n_tokens)[:size])


def fuzzy_in_context_recall(rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 128,
                            k_motif_size: int = 3, v_motif_size: int = 3,
                            is_training: bool = True, multi_query: bool = True,
                            noise_vocab_size: int = 0, frac_noise: float = 0.0
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Recall where keys and values are motifs of 1..k_motif_size / 1..v_motif_size tokens.

    A probe pair is placed at a random position and repeated at the end; test keys always have
    ``k_motif_size`` tokens. The sequence is left-padded with ``pad`` (``vocab_size - 1`` when
    multi-query, else ``vocab_size - 2``) to ``seq_len + 1`` tokens before the shift.
    """
    _check_int("k_motif_size", k_motif_size, 1)
    _check_int("v_motif_size", v_motif_size, 1)
    _check_fraction("frac_noise", frac_noise)
    n_plain = (vocab_size - 1 if multi_query else vocab_size - 2) - noise_vocab_size
    pad = vocab_size - 1 if multi_query else vocab_size - 2
    n_keys = n_plain // 2
    if n_keys < k_motif_size or n_plain - n_keys < v_motif_size:
        raise ValueError(f"vocab_size={vocab_size} has too few key/value tokens for motifs of "
                         f"{k_motif_size}/{v_motif_size} distinct tokens")
    if frac_noise > 0 and noise_vocab_size < 1:
        raise ValueError("noise_vocab_size must be >= 1 when frac_noise > 0")
    longest = k_motif_size + v_motif_size
    _check_int("seq_len", seq_len, 3 * longest + 2)
    key_sizes = list(range(1, k_motif_size + 1)) if is_training else [k_motif_size]
    n_values = n_plain - n_keys
    k_probe = _motif(rng, 0, n_keys, key_sizes[int(rng.integers(len(key_sizes)))])
    v_probe = _motif(rng, n_keys, n_values, int(rng.integers(1, v_motif_size + 1)))
    probe_len = len(k_probe) + len(v_probe)
    # Every loop step adds at most `longest` tokens, so a step starts at or after any position
    # up to `limit - longest`: a probe slot drawn there is always filled. (The public code draws
    # it up to `seq_len - 2 * probe_len`, past the loop's end for short probes, and then
    # leaves the probed pair out of the context.)
    limit = seq_len - probe_len - longest
    probe_at = int(rng.integers(limit - longest + 1))
    probe_added = False
    kv: dict[tuple[int, ...], tuple[int, ...]] = {}
    inputs: list[int] = []
    targets: list[int] = []
    while len(inputs) < limit:
        k_size = key_sizes[int(rng.integers(len(key_sizes)))]
        v_size = int(rng.integers(1, v_motif_size + 1))
        if not probe_added and len(inputs) >= probe_at:
            inputs += [*k_probe, *v_probe]
            targets += [IGNORE] * probe_len
            kv[k_probe] = v_probe
            probe_added = True
            continue
        if frac_noise > 0 and rng.random() < frac_noise:
            n = k_size + v_size
            inputs += [int(t) for t in rng.integers(n_plain, n_plain + noise_vocab_size, n)]
            targets += [IGNORE] * n
            continue
        k = _motif(rng, 0, n_keys, k_size)
        if k == k_probe:
            probe_added = True
        seen = k in kv
        if not seen:
            kv[k] = v_probe if k == k_probe else _motif(rng, n_keys, n_values, v_size)
        v = kv[k]
        inputs += [*k, *v]
        targets += [IGNORE] * len(k) + (list(v) if seen and multi_query else [IGNORE] * len(v))
    if not multi_query:
        inputs.append(vocab_size - 1)
        targets.append(IGNORE)
    inputs += [*k_probe, *v_probe]
    targets += [IGNORE] * len(k_probe) + list(v_probe)
    n_pad = seq_len + 1 - len(inputs)
    x = np.asarray([pad] * n_pad + inputs, dtype=np.int64)
    y = np.asarray([IGNORE] * n_pad + targets, dtype=np.int64)
    return (x[:-1], x[1:]) if is_training else (x[:-1], y[1:])


def selective_copying(rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 256,
                      num_tokens_to_copy: int = 16, is_training: bool = True
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` content tokens with ``seq_len - 2n - 1`` blanks scattered among them, a copy token,
    ``n`` blanks; the targets of those last ``n`` positions are the content tokens in order.

    Blank ``vocab_size - 2``, copy ``vocab_size - 1``, content ``[0, vocab_size - 2)``. Each
    blank goes before a content token drawn uniformly (as in the public code, never after the
    last one), from ``rng``. Train and test examples follow the same rule.
    """
    _check_int("vocab_size", vocab_size, 3)
    _check_int("num_tokens_to_copy", num_tokens_to_copy, 1)
    if seq_len <= 2 * num_tokens_to_copy + 1:
        raise ValueError(f"seq_len must be > 2 * num_tokens_to_copy + 1 = "
                         f"{2 * num_tokens_to_copy + 1}, got {seq_len}")
    n = num_tokens_to_copy
    blank, copy = vocab_size - 2, vocab_size - 1
    n_blanks = seq_len - 2 * n - 1
    content = rng.integers(0, vocab_size - 2, n)
    before = rng.integers(0, n, n_blanks)  # blank i goes right before content token before[i]
    blanks_before = np.bincount(before, minlength=n)
    head: list[int] = []
    for token, count in zip(content.tolist(), blanks_before.tolist()):
        head += [blank] * count + [token]
    x = np.asarray(head + [copy] + [blank] * n, dtype=np.int64)
    y = np.full(seq_len, IGNORE, dtype=np.int64)
    y[-n:] = content
    return x, y


def compression(rng: np.random.Generator, vocab_size: int = 16, seq_len: int = 32,
                noise_vocab_size: int = 0, frac_noise: float = 0.0, is_training: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
    """``seq_len - 1`` random tokens then the compression token ``vocab_size - 1``; the targets
    reproduce the whole sequence (an auto-encoder pools it into one vector and decodes it).

    With ``frac_noise > 0`` noise tokens replace some inputs and their targets are ignored (the
    public code built these targets but returned the inputs instead).
    """
    _check_int("vocab_size", vocab_size, 2)
    _check_int("seq_len", seq_len, 2)
    _check_fraction("frac_noise", frac_noise)
    n_plain = vocab_size - 1 - noise_vocab_size
    if n_plain < 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no plain tokens")
    if frac_noise > 0 and noise_vocab_size < 1:
        raise ValueError("noise_vocab_size must be >= 1 when frac_noise > 0")
    x = np.append(rng.integers(0, n_plain, seq_len - 1), vocab_size - 1).astype(np.int64)
    y = x.copy()
    if frac_noise > 0:
        for i in range(seq_len - 1):
            if rng.random() < frac_noise:
                x[i] = rng.integers(n_plain, n_plain + noise_vocab_size)
                y[i] = IGNORE
    return x, y


def memorization_map(vocab_size: int, seed: int = 12345) -> dict[int, int]:
    """The fixed key -> value map of memorization: keys ``[0, (V-1)//2)``, values a seeded
    shuffle of ``[(V-1)//2, V-1)`` (``V - 1`` is the insert token)."""
    _check_int("vocab_size", vocab_size, 4)
    n_plain = vocab_size - 1
    n_keys = n_plain // 2
    map_rng = np.random.default_rng(seed)
    keys = map_rng.permutation(n_keys)
    values = n_keys + map_rng.permutation(n_plain - n_keys)
    return {int(k): int(v) for k, v in zip(keys, values)}


def memorization(rng: np.random.Generator, vocab_size: int = 256, seq_len: int = 32,
                 kv_map: dict[int, int] | None = None, seed: int = 12345,
                 is_training: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``seq_len / 2`` pairs ``[key, insert]`` whose target at the insert token is the key's value
    under a map fixed across the whole data set (no in-context information: it must be learned).
    """
    _check_int("seq_len", seq_len, 2)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (key, insert pairs), got {seq_len}")
    kv = kv_map if kv_map is not None else memorization_map(vocab_size, seed)
    keys = np.asarray(sorted(kv), dtype=np.int64)
    chosen = keys[rng.integers(0, len(keys), seq_len // 2)]
    x = np.empty(seq_len, dtype=np.int64)
    y = np.full(seq_len, IGNORE, dtype=np.int64)
    x[0::2], x[1::2] = chosen, vocab_size - 1
    y[1::2] = [kv[int(k)] for k in chosen]
    return x, y


GENERATORS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "in-context-recall": in_context_recall,
    "fuzzy-in-context-recall": fuzzy_in_context_recall,
    "noisy-in-context-recall": noisy_in_context_recall,
    "selective-copying": selective_copying,
    "compression": compression,
    "memorization": memorization,
}
TASKS = tuple(GENERATORS)
