"""``aa-compile generate --checkpoint PATH "prompt"`` on released folders: a T-FREE one (the
public trigrams layout) and a HAT one (Hugging Face layout), both written by hand by the
loader tests' fixtures (tests/test_tfree_pretrained.py, tests/test_pretrained_hat.py).

The printed text must be what the loaded model generates greedily in eager mode (the CLI runs
it with ``backend="aa"``, inner compiler eager on the CPU), and stderr must carry the
throughput in the model's unit (words/s for T-FREE, bytes/s for HAT)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from aa_compile.cli import main
from aa_compile.models.hat import HATModel
from aa_compile.models.tfree import TFreeLM
from tests.test_pretrained_hat import write_released as write_hat
from tests.test_tfree_pretrained import PROMPT, WORDS
from tests.test_tfree_pretrained import write_released as write_tfree

FIGURE = r"generated (\d+) {unit} in [0-9.]+ s: [0-9.]+ {unit}/s \({kind}, cpu, {how}"


@pytest.fixture
def tfree_dir(tmp_path):
    return write_tfree(tmp_path / "tfree")


@pytest.fixture
def hat_dir(tmp_path):
    write_hat(tmp_path / "hat")
    return tmp_path / "hat"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["generate", *argv, "--threads", "1"])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("backend", ["aa", "eager"])
def test_tfree_released_folder(tfree_dir, capsys, backend):
    model = TFreeLM.from_pretrained(tfree_dir)
    words = model.generate(model.tokenizer, PROMPT, 4, words=WORDS)
    expected = model.tokenizer.decode(model.tokenizer.words(PROMPT) + words)
    rc, out, err = _run(capsys, "--checkpoint", str(tfree_dir), PROMPT, "--max-new-tokens",
                        "4", "--backend", backend)
    assert rc == 0, err
    assert out == expected + "\n"
    how = "backend aa, inner compiler eager" if backend == "aa" else "eager"
    found = re.search(FIGURE.format(unit="words", kind="tfree", how=how), err)
    assert found and int(found.group(1)) == len(words)


@pytest.mark.parametrize("backend", ["aa", "eager"])
def test_hat_released_folder(hat_dir, capsys, backend):
    model = HATModel.from_pretrained(hat_dir)
    data, _ = model.generate_bytes("ab", max_bytes=6)
    expected = "ab" + model.splitter.decode(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, out, err = _run(capsys, "--checkpoint", str(hat_dir), "ab", "--max-new-tokens", "6",
                            "--backend", backend)
    assert rc == 0, err
    assert out == expected + "\n"
    how = "backend aa, inner compiler eager" if backend == "aa" else "eager"
    found = re.search(FIGURE.format(unit="bytes", kind="hat", how=how), err)
    assert found and int(found.group(1)) == len(data)


def test_tfree_dictionary_options(tfree_dir, tmp_path, capsys):
    """--max-words cuts the checkpoint's dictionary; --words adds a file's words."""
    model = TFreeLM.from_pretrained(tfree_dir)
    extra = tmp_path / "words.txt"
    extra.write_text("zebra\nquokka\n\n")
    words = model.generate(model.tokenizer, PROMPT, 3, words=WORDS[:2] + ["zebra", "quokka"])
    expected = model.tokenizer.decode(model.tokenizer.words(PROMPT) + words)
    rc, out, err = _run(capsys, "--checkpoint", str(tfree_dir), "--prompt", PROMPT,
                        "--max-new-tokens", "3", "--max-words", "2", "--words", str(extra),
                        "--backend", "eager")
    assert rc == 0, err
    assert out == expected + "\n"


def test_dtype_option_converts(hat_dir, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, out, err = _run(capsys, "--checkpoint", str(hat_dir), "ab", "--max-new-tokens", "2",
                            "--backend", "eager", "--dtype", "float32")
    model = HATModel.from_pretrained(hat_dir, dtype="float32")
    data, _ = model.generate_bytes("ab", max_bytes=2)
    assert rc == 0, err
    assert out == "ab" + model.splitter.decode(data) + "\n"


def test_bad_input(tfree_dir, hat_dir, tmp_path, capsys):
    rc, _, err = _run(capsys, "--checkpoint", str(tfree_dir), "x", "--prompt", "y")
    assert rc == 2 and "not both" in err
    rc, _, err = _run(capsys, "--checkpoint", str(tfree_dir), "x", "--max-words", "-1")
    assert rc == 2 and "--max-words must be >= 0" in err
    rc, _, err = _run(capsys, "--checkpoint", str(tfree_dir), "x", "--words",
                      str(tmp_path / "none.txt"), "--backend", "eager")
    assert rc == 2 and "--words" in err and "none.txt" in err
    rc, _, err = _run(capsys, "--checkpoint", str(tfree_dir), "x", "--tokenizer", "bytes")
    assert rc == 2 and "--tokenizer does not apply to T-FREE" in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, _, err = _run(capsys, "--checkpoint", str(hat_dir), "x", "--max-words", "3")
    assert rc == 2 and "T-FREE models only" in err
    (tfree_dir / "transformer" / "transformer.pt").write_bytes(b"garbage")
    rc, _, err = _run(capsys, "--checkpoint", str(tfree_dir), "x")
    assert rc == 2 and "transformer.pt: not a readable torch.save file" in err
    rc, _, err = _run(capsys, "--checkpoint", str(tmp_path / "missing"), "x")
    assert rc == 2 and "generate takes a saved model directory" in err
    assert torch.get_num_threads() >= 1
