"""``python -m aa_compile.bench [ARGS]``: the benchmark harness, from any directory.

The harness is the ``bench/`` folder of the source repository, not part of the installed
package; ``python -m bench`` finds it only from the repository root. This entry finds that root
from where ``aa_compile`` is installed (an editable install from a checkout: ``make bench``,
``pip install -e '.[bench]'``) and runs ``python -m bench ARGS`` with it on the import path, in
the current directory (so a relative ``--out`` means what it says). From a wheel install there
is no harness: it says where to get one and exits with status 2.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys


def checkout_root() -> pathlib.Path | None:
    """The source checkout ``aa_compile`` is installed from, if it holds the harness."""
    root = pathlib.Path(__file__).resolve().parent.parent
    return root if (root / "bench" / "__main__.py").is_file() else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = checkout_root()
    if root is None:
        print(
            "aa_compile.bench: the benchmark harness is not installed with the package; it is "
            "the bench/ folder of the source repository. Clone the repository, install it "
            "with `pip install -e '.[bench]'` (or run `make bench`), then run "
            "`python -m bench` from its root or `python -m aa_compile.bench` from anywhere.",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "bench", *argv], env=env)
    # Ctrl-C reaches the harness too (same process group), which finishes its report; wait
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
