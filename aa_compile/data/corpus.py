"""English and German text available offline, for tiny training runs and benchmarks.

No network and no model hub at run time, so the corpora come from the machine itself:

- ``"en"``: the docstrings of a fixed list of Python standard-library modules and their public
  functions and classes (real English prose with code words mixed in; it varies slightly
  between Python versions, so benchmarks report the corpus' bytes/word with their numbers);
- ``"de"``: German sentences generated from a small hand-written grammar (our own word lists:
  nouns with articles, verbs, adjectives, adverbs, umlauts and ß, numbers, punctuation), with a
  fixed seed, so the same text on every machine.

`documents(language)` returns a list of documents, `text(language)` their concatenation
separated by blank lines. ``"mixed"`` interleaves the two.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import warnings

LANGUAGES = ("en", "de", "mixed")

_STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fractions", "functools", "getopt", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "logging", "mailbox", "math", "mimetypes", "numbers", "operator", "optparse", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex",
    "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse",
    "uuid", "warnings", "weakref", "zipfile",
)


@functools.cache
def _english() -> tuple[str, ...]:
    docs = []
    for name in _STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - a trimmed Python
            continue
        parts = [inspect.getdoc(module) or ""]
        for attr in sorted(vars(module)):
            with warnings.catch_warnings():  # e.g. typing.io / typing.re deprecations
                warnings.simplefilter("ignore")
                obj = getattr(module, attr)
                if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                if inspect.isfunction(obj) or inspect.isclass(obj):
                    parts.append(inspect.getdoc(obj) or "")
        doc = "\n\n".join(p.strip() for p in parts if p and p.strip())
        if doc:
            docs.append(doc)
    return tuple(docs)


# -- German: a small grammar (our own word lists) ------------------------------------------

_NOUNS = (  # (article nominative, article accusative, noun)
    ("der", "den", "Bäcker"), ("die", "die", "Lehrerin"), ("das", "das", "Mädchen"),
    ("der", "den", "Bürgermeister"), ("die", "die", "Straße"), ("das", "das", "Fahrrad"),
    ("der", "den", "Fluss"), ("die", "die", "Brücke"), ("das", "das", "Gebäude"),
    ("der", "den", "Zug"), ("die", "die", "Überraschung"), ("das", "das", "Frühstück"),
    ("der", "den", "Schlüssel"), ("die", "die", "Größe"), ("das", "das", "Märchen"),
    ("der", "den", "Wald"), ("die", "die", "Küche"), ("das", "das", "Gemüse"),
    ("der", "den", "Computer"), ("die", "die", "Rechnung"), ("das", "das", "Ergebnis"),
    ("der", "den", "Nachbar"), ("die", "die", "Stadtverwaltung"), ("das", "das", "Wörterbuch"),
)
_VERBS = (
    "sieht", "kauft", "repariert", "findet", "öffnet", "beschreibt", "vergisst", "trägt",
    "überprüft", "bemerkt", "verkauft", "erklärt", "füllt", "schließt", "wählt", "begrüßt",
)
_ADJECTIVES = (
    "alte", "neue", "schöne", "große", "kleine", "müde", "fröhliche", "grüne", "schwere",
    "günstige", "ruhige", "dunkle", "heiße", "merkwürdige",
)
_ADVERBS = (
    "heute", "morgen", "gestern", "oft", "selten", "plötzlich", "gründlich", "langsam",
    "schnell", "natürlich", "vielleicht", "übrigens",
)
_PLACES = (
    "im Rathaus", "am Bahnhof", "in der Küche", "auf dem Marktplatz", "hinter dem Haus",
    "über der Brücke", "neben der Schule", "im Wald", "an der Ecke", "während der Pause",
)
_CONNECTORS = ("weil", "obwohl", "nachdem", "bevor", "sodass")


def _german_sentence(rng: random.Random) -> str:
    (art, _, subj), (_, acc, obj) = rng.choice(_NOUNS), rng.choice(_NOUNS)
    adj = rng.choice(_ADJECTIVES)
    acc_adj = adj if acc != "den" else adj + "n"
    head = (f"{art.capitalize()} {rng.choice(_ADJECTIVES)} {subj} {rng.choice(_VERBS)} "
            f"{rng.choice(_ADVERBS)} {acc} {acc_adj} {obj} {rng.choice(_PLACES)}")
    r = rng.random()
    if r < 0.25:
        (art2, _, subj2) = rng.choice(_NOUNS)
        head += (f", {rng.choice(_CONNECTORS)} {art2} {subj2} {rng.randint(2, 1999)} "
                 f"Euro {rng.choice(('bezahlt', 'verloren', 'gespart', 'gefunden'))} hat")
    elif r < 0.35:
        head += f" (um {rng.randint(0, 23)}:{rng.randint(0, 59):02d} Uhr)"
    return head + rng.choice((".", ".", ".", "!", "?"))


@functools.cache
def _german(n_docs: int = 60, sentences: int = 40, seed: int = 0) -> tuple[str, ...]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        paragraphs = []
        left = sentences
        while left > 0:
            k = min(left, rng.randint(3, 8))
            paragraphs.append(" ".join(_german_sentence(rng) for _ in range(k)))
            left -= k
        docs.append("\n\n".join(paragraphs))
    return tuple(docs)


def documents(language: str = "en") -> list[str]:
    """The documents of ``language`` (``"en"``, ``"de"`` or ``"mixed"``)."""
    if language == "en":
        return list(_english())
    if language == "de":
        return list(_german())
    if language == "mixed":
        en, de = _english(), _german()
        out = []
        for i in range(max(len(en), len(de))):
            out.extend(d[i] for d in (en, de) if i < len(d))
        return out
    raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")


def text(language: str = "en", max_bytes: int | None = None) -> str:
    """All documents of ``language`` joined by blank lines, cut to at most ``max_bytes`` UTF-8
    bytes (at a character boundary) when given."""
    out = "\n\n".join(documents(language))
    if max_bytes is not None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        out = out.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return out
