"""The argument parser every command uses: a user's mistake in its flags is one line."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse with a user's mistake on one line (`error: ... (see --help)`, exit 2) instead of
    the usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
