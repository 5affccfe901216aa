"""Path arguments of the commands (argparse ``type=``): a bad path is argparse's one-line error (exit 2)
before the command starts."""

from __future__ import annotations

import argparse


def output_folder(text: str) -> str:
    """A folder that exists or can be made, and written into."""
    from clinkd.data.paths import folder_problem

    problem = folder_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text} {problem}")
    return text


def output_file(text: str) -> str:
    """A file that can be written (its folder exists or can be made)."""
    from clinkd.data.paths import output_file_problem

    problem = output_file_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text} {problem}")
    return text


def input_folder(text: str) -> str:
    """An existing folder."""
    import os

    try:
        ok = os.path.isdir(text)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return text


__all__ = ["input_folder", "output_file", "output_folder"]
