"""Finds Debian's promtool and prometheus for the tests that need them (package `prometheus`)."""

from __future__ import annotations

import shutil

import pytest


def require_binary(name: str) -> str:
    """Path of `name`; `make test` installs it (`make system-deps`), so a missing one fails the test."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (Debian package `prometheus`)")
    return path
