"""Each integration imports without the other frameworks, and names its extra when its own is missing.

A framework is "not installed" for a child interpreter when its ``sys.modules`` entry is None:
importing it then raises ImportError, as for a missing package.
"""

from __future__ import annotations

import json
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
}
ALL = sorted({p for packages in FRAMEWORKS.values() for p in packages} | {"verl"})
#: What a framework imports itself when installed (torchmetrics, a Lightning dependency, imports
#: transformers): blocking it would break the framework, not test otel_ml.
USES = {"lightning": ("transformers",)}


def _run(blocked: list[str], body: str) -> subprocess.CompletedProcess:
    code = f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_package_verl_and_torchelastic_import_no_framework():
    pytest.importorskip("torch")
    result = _run(
        ALL, "import otel_ml.integrations, otel_ml.integrations.verl, otel_ml.integrations.torchelastic"
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", sorted(FRAMEWORKS))
def test_each_module_imports_without_the_other_frameworks(module):
    pytest.importorskip(FRAMEWORKS[module][0])
    others = [p for p in ALL if p not in FRAMEWORKS[module] and p not in USES.get(module, ())]
    result = _run(others, f"import otel_ml.integrations.{module}")
    assert result.returncode == 0, result.stderr


def test_a_missing_framework_names_the_extra_to_install():
    body = f"""
        import importlib, json
        messages = {{}}
        for module in {sorted(FRAMEWORKS)!r}:
            try:
                importlib.import_module("otel_ml.integrations." + module)
            except ImportError as exc:
                messages[module] = str(exc)
        print(json.dumps(messages))
        """
    result = _run(ALL, body)
    assert result.returncode == 0, result.stderr
    messages = json.loads(result.stdout)
    for module in FRAMEWORKS:
        assert f"pip install 'otel-ml[{module}]'" in messages[module]
