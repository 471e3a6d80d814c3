"""``python -m aa_compile.mad run | report`` (the same as ``aa-compile mad``)."""

import sys

from .cli import main

sys.exit(main())
