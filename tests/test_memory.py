"""r2m_lab.memory: which allocator settings it asks for, and what it says when the C library refuses or lacks them.

A fake C library stands in for glibc, so the test checks r2m_lab's calls and answers rather than the host's libc.
"""

from __future__ import annotations

import logging

import pytest

import r2m_lab.memory as memory


class Mallopt:
    """Stands in for a ctypes function: records its calls and takes an ``argtypes`` attribute."""

    def __init__(self, answer: int) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer
        self.argtypes = None

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


class FakeLibc:
    def __init__(self, answer: int = 1, has_mallopt: bool = True) -> None:
        self.function = Mallopt(answer)
        self.calls = self.function.calls
        if has_mallopt:
            self.mallopt = self.function


def install(monkeypatch: pytest.MonkeyPatch, libc: FakeLibc) -> None:
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: libc)


def test_raises_both_glibc_thresholds_to_the_requested_size(monkeypatch):
    libc = FakeLibc()
    install(monkeypatch, libc)
    assert memory.reuse_freed_memory(threshold=1 << 20) is True
    # M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1), malloc.h's numbers, both to the threshold
    assert libc.calls == [(-3, 1 << 20), (-1, 1 << 20)]
    assert libc.function.argtypes is not None, "the C signature is declared before the call"
    assert memory.reuse_freed_memory() is True and libc.calls[-1] == (-1, memory.DEFAULT_THRESHOLD)


def test_a_refused_setting_returns_false_and_says_so(monkeypatch, caplog):
    install(monkeypatch, FakeLibc(answer=0))
    with caplog.at_level(logging.INFO, logger="r2m_lab.memory"):
        assert memory.reuse_freed_memory(threshold=123) is False
    assert "refused mallopt thresholds of 123 bytes" in caplog.text


def test_a_libc_without_mallopt_returns_false_and_says_so(monkeypatch, caplog):
    install(monkeypatch, FakeLibc(has_mallopt=False))
    with caplog.at_level(logging.INFO, logger="r2m_lab.memory"):
        assert memory.reuse_freed_memory() is False
    assert "No glibc mallopt" in caplog.text


def test_no_c_library_at_all_returns_false(monkeypatch, caplog):
    def missing(name):
        raise OSError("no such library")

    monkeypatch.setattr(memory.ctypes, "CDLL", missing)
    with caplog.at_level(logging.INFO, logger="r2m_lab.memory"):
        assert memory.reuse_freed_memory() is False
    assert "default allocator" in caplog.text
