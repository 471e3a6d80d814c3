"""The help formatter of every ``aa-compile`` subcommand: each option shows its default, unless
its help text already says what the default is (``--tau``'s "n_tokens / 2", say)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`argparse.ArgumentDefaultsHelpFormatter` that leaves a help text naming its default as
    it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)
