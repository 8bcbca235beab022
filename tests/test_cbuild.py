"""Which C extensions load: OTEL_ML_PURE_PYTHON, OTEL_ML_REQUIRE_C, missing and stale builds."""

from __future__ import annotations

import pytest

from otel_ml import _cbuild


def test_a_missing_extension_means_the_python_twin_unless_ci_requires_the_build(monkeypatch):
    monkeypatch.delenv("OTEL_ML_PURE_PYTHON", raising=False)
    monkeypatch.setenv("OTEL_ML_REQUIRE_C", "0")
    assert _cbuild.extension("otel_ml._never_built") is None
    monkeypatch.setenv("OTEL_ML_REQUIRE_C", "1")
    with pytest.raises(ImportError, match=r"otel_ml\._never_built is not built and OTEL_ML_REQUIRE_C is set"):
        _cbuild.extension("otel_ml._never_built")


def test_pure_python_turns_off_even_a_built_extension(monkeypatch):
    monkeypatch.setenv("OTEL_ML_PURE_PYTHON", "1")
    monkeypatch.setenv("OTEL_ML_REQUIRE_C", "1")  # pure Python wins: nothing is required then
    assert _cbuild.extension("json") is None
    monkeypatch.setenv("OTEL_ML_PURE_PYTHON", "0")
    assert _cbuild.extension("json").__name__ == "json"


def test_a_stale_build_warns_and_falls_back_or_fails_under_require_c(monkeypatch):
    monkeypatch.setenv("OTEL_ML_REQUIRE_C", "")
    with pytest.warns(RuntimeWarning, match="stale; using Python"):
        assert _cbuild.stale_build("stale", "using Python") is None
    monkeypatch.setenv("OTEL_ML_REQUIRE_C", "1")
    with pytest.raises(ImportError, match=r"^stale$"):
        _cbuild.stale_build("stale", "using Python")
