"""Checks of the paths the commands read and write, made before any work: a file to read must be a
regular file (a FIFO or a device is only looked at, never opened: reading one could block forever);
a folder to write must exist and be writable, or be creatable."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file ("does not exist", "is not a regular file (a folder)", ...),
    or None when it is a regular file."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except ValueError as e:  # a NUL in the path, a name the file system cannot encode
        return f"is not a usable path ({e})"
    if stat.S_ISREG(mode):
        return None
    kind = (
        "a folder"
        if stat.S_ISDIR(mode)
        else "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a file"
    )
    return f"is not a regular file ({kind})"


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why a folder cannot be written at ``path`` (creating it and its parents where missing): "is not a
    folder", "cannot be created: PARENT is a file", "is not writable", ...; None when it can."""
    path = Path(path)
    try:
        if path.exists():
            if not path.is_dir():
                return "is not a folder (a file is in its place)"
            if not os.access(path, os.W_OK | os.X_OK):
                return "is not writable"
            return None
        if path.is_symlink():  # a dangling link in its place: mkdir would fail on it
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        for ancestor in path.parents:
            if ancestor.exists():
                if not ancestor.is_dir():
                    return f"cannot be created: {ancestor} is a file, not a folder"
                if not os.access(ancestor, os.W_OK | os.X_OK):
                    return f"cannot be created: {ancestor} is not writable"
                return None
            if ancestor.is_symlink():  # a dangling link: mkdir would fail on it
                return f"cannot be created: {ancestor} is a broken link"
    except OSError as e:
        return f"cannot be used ({e.strerror or e})"
    except ValueError as e:
        return f"is not a usable path ({e})"
    return None


def output_file_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at ``path`` (its folder created where missing), or None."""
    path = Path(path)
    try:
        if path.is_dir():
            return "is a folder, not a file"
        if path.exists() and not path.is_file():
            return "is not a regular file"
    except OSError as e:
        return f"cannot be used ({e.strerror or e})"
    except ValueError as e:
        return f"is not a usable path ({e})"
    problem = folder_problem(path.parent)
    return None if problem is None else f"cannot be written: its folder {path.parent} {problem}"
