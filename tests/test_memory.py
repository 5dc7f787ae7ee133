"""postrl.run.memory: glibc keeps freed blocks for reuse (fewer page faults per step), with an opt-out."""

from __future__ import annotations

import platform

import pytest

from postrl.run import memory


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(memory, "_applied", False)
    return memory


def test_opt_out_leaves_the_allocator_alone(fresh, monkeypatch):
    monkeypatch.setenv("POSTRL_MALLOC", "default")
    assert fresh.keep_freed_memory() is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applied_once_on_glibc(fresh, monkeypatch):
    monkeypatch.delenv("POSTRL_MALLOC", raising=False)
    assert fresh.keep_freed_memory() is True
    assert fresh._applied
    assert fresh.keep_freed_memory() is True  # idempotent


def test_other_platforms_are_left_alone(fresh, monkeypatch):
    monkeypatch.delenv("POSTRL_MALLOC", raising=False)
    monkeypatch.setattr(memory.platform, "system", lambda: "Darwin")
    assert fresh.keep_freed_memory() is False
