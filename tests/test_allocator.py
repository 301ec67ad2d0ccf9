"""The malloc thresholds training sets (see xmlgame.allocator)."""

import platform

from xmlgame import allocator


def test_thresholds_are_set_once_under_glibc_and_left_alone_elsewhere(monkeypatch):
    monkeypatch.setattr(allocator, "_done", None)
    calls = []
    real_cdll = allocator.ctypes.CDLL

    def counting_cdll(*args, **kwargs):
        calls.append(args)
        return real_cdll(*args, **kwargs)

    monkeypatch.setattr(allocator.ctypes, "CDLL", counting_cdll)
    first = allocator.keep_batch_buffers()
    assert allocator.keep_batch_buffers() is first  # the second call changes nothing
    assert len(calls) == (1 if platform.system() == "Linux" else 0)
    assert first == (platform.libc_ver()[0] == "glibc")


def test_elsewhere_than_linux_nothing_is_touched(monkeypatch):
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setattr(allocator.sys, "platform", "darwin")

    def no_cdll(*args, **kwargs):
        raise AssertionError("the C library should not be opened")

    monkeypatch.setattr(allocator.ctypes, "CDLL", no_cdll)
    assert allocator.keep_batch_buffers() is False
