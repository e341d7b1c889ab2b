import subprocess
import sys

import mlsem
from mlsem import model


def test_compiled_kernel_is_used():
    assert model._core is not None, "mlsem._core is not built: install with pip install -e ."
    res = mlsem.fit(mlsem.example_data(), "y ~ x + (1 | k/j)")
    assert res.model.backend == "cython"


def test_example_command_runs():
    out = subprocess.run([sys.executable, "-m", "mlsem", "example"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "var(Residual)" in out.stdout and "Log likelihood" in out.stdout
