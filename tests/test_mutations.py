"""The suite's strength, measured: every wiring mutation of ``tests/scripts/mutate.py`` makes the default
suite fail, and the unmutated copy passes (issue #19). Minutes, so marked slow: ``pytest -m slow``."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "mutate.py"


def mutation_names() -> list[str]:
    spec = importlib.util.spec_from_file_location("mutate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [m.name for m in module.MUTATIONS]


@pytest.mark.slow
def test_every_wiring_mutation_fails_the_suite():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=3600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-6000:]
    assert "clean copy: suite PASSED" in report
    for name in mutation_names():
        assert f"mutation {name}: suite FAILED (as it must)" in report, report
