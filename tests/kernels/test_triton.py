"""kernels/_triton.py: the lazy jit decides compiled vs interpreted on every Triton the torch range
admits (Triton 3.2/3.3 have no ``triton.knobs``)."""

from __future__ import annotations

import types

import pytest

from rexmoe_train.kernels import _triton


def _body():
    pass


def test_lazy_jit_without_triton_knobs_reads_the_environment(monkeypatch):
    """A Triton without ``knobs`` (3.2/3.3) decorates for the interpreter when TRITON_INTERPRET=1 is
    set at decoration: the lazy kernel keys its cache the same way instead of failing at launch."""
    decorated = []

    def jit(fn):
        decorated.append(fn)
        return {"grid": fn}

    monkeypatch.setattr(_triton, "triton", types.SimpleNamespace(jit=jit))  # no `knobs` attribute
    kernel = _triton._LazyKernel(_body)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel["grid"] is _body and set(kernel._by_mode) == {True}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernel["grid"] is _body and set(kernel._by_mode) == {True, False}
    kernel["grid"]
    assert len(decorated) == 2  # once per mode


def test_interpreting_follows_triton_knobs_where_present(monkeypatch):
    if not _triton.HAVE_TRITON or getattr(_triton.triton, "knobs", None) is None:
        pytest.skip("this triton has no knobs (covered above)")
    for value in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _triton.interpreting() == bool(_triton.triton.knobs.runtime.interpret) == (value == "1")
