"""Shared fixtures: the real click logs (skipped when absent) and the embedded broker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, the real click logs; tests needing them skip when it is absent (never in CI)."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_DATA} is missing on CI")
        pytest.skip(f"real click logs not found at {SHARED_DATA} (they are not part of the repo)")
    return SHARED_DATA


@pytest.fixture()
def broker():
    """A fresh embedded Kafka-protocol broker (Tansu, memory storage) on a free loopback port."""
    from stream.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b
