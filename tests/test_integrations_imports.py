"""Each integration imports without the other frameworks, and names its extra when its own is missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

#: module -> the top-level packages of its framework.
FRAMEWORKS = {
    "transformers": ("transformers",),
    "lightning": ("lightning", "pytorch_lightning"),
    "accelerate": ("accelerate",),
    "tensorboard": ("tensorboard", "tensorboardX"),
    "verl": (),
    "torchelastic": (),
}
ALL = sorted({p for packages in FRAMEWORKS.values() for p in packages} | {"verl"})
#: What a framework imports itself when installed (torchmetrics, a Lightning dependency, imports
#: transformers): blocking it would break the framework, not test otel_ml.
USES = {"lightning": ("transformers",)}


def _import_with_blocked(module: str, blocked: list[str]) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # import of a blocked package raises ImportError
        import otel_ml.integrations
        import otel_ml.integrations.{module}
        print("imported")
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_package_imports_no_framework():
    result = _import_with_blocked("_keys", ALL)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", sorted(FRAMEWORKS))
def test_each_module_imports_without_the_other_frameworks(module):
    pytest.importorskip(module if module not in ("verl", "torchelastic") else "torch")
    others = [p for p in ALL if p not in FRAMEWORKS[module] and p not in USES.get(module, ())]
    result = _import_with_blocked(module, others)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", ["transformers", "lightning", "accelerate", "tensorboard"])
def test_a_missing_framework_names_the_extra_to_install(module):
    result = _import_with_blocked(module, list(FRAMEWORKS[module]))
    assert result.returncode != 0
    assert f"pip install 'otel-ml[{module}]'" in result.stderr
