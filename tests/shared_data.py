"""The workspace's shared folder (``../shared``: parity fixtures, sample photos, benchmark configs), for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def locate_shared(*parts: str, env: str | None = None) -> Path:
    """A path under ../shared, or the one named by the environment variable ``env`` when it is set."""
    return Path(os.environ[env]) if env and os.environ.get(env) else SHARED.joinpath(*parts)


def shared_path(*parts: str, env: str | None = None) -> Path:
    """Like :func:`locate_shared`, for a test that needs the path. Users' clones have no ../shared, so such tests
    skip there; CI has it, and a missing folder under CI is a failure, never a skip."""
    path = locate_shared(*parts, env=env)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing; CI must have ../shared beside the clone.")
        pytest.skip(f"{path} not found (../shared is only present in the project's CI and workspaces).")
    return path
