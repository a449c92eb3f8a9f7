"""argparse types the commands share (building blocks with a command of their own use them too)."""
from __future__ import annotations

import argparse


def positive(kind=float):
    """An argparse type: a number of `kind` above 0 (a bad value is refused at the argument, whatever else the
    command line holds, with argparse's usage line)."""
    def convert(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    convert.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" message
    return convert
