import subprocess
import sys

import mlsem
from mlsem.model import multilevel as model


def test_compiled_kernel_is_used():
    assert model._core is not None, "mlsem.model._core is not built: install with pip install -e ."
    res = mlsem.fit(mlsem.example_data(), "y ~ x + (1 | k/j)")
    assert res.model.backend == "cython"


def test_example_command_runs():
    out = subprocess.run([sys.executable, "-m", "mlsem", "example"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "var(Residual)" in out.stdout and "Log likelihood" in out.stdout


def test_threadpoolctl_is_a_dependency():
    """The BLAS pinning the speed relies on needs threadpoolctl: a plain
    install must bring it."""
    from importlib.metadata import requires
    assert any(r.startswith("threadpoolctl") for r in requires("mlsem"))
    import threadpoolctl  # noqa: F401


def test_missing_kernel_warns_once_and_is_recorded():
    """With the compiled extension hidden, backend='auto' falls back to the
    NumPy oracle loudly: one PerformanceWarning naming the import error,
    res.backend == 'numpy' and a note in the summary."""
    import subprocess
    import sys
    code = r'''
import sys, warnings
sys.modules["mlsem.model._core"] = None          # the extension cannot be imported
import mlsem
data = mlsem.example_data()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    r1 = mlsem.fit(data, "y ~ x + (1 | k/j)")
    r2 = mlsem.fit(data, "y ~ x + (1 | k/j)")
perf = [x for x in w if issubclass(x.category, mlsem.PerformanceWarning)]
assert len(perf) == 1, [str(x.message) for x in w]
msg = str(perf[0].message)
assert "mlsem.model._core could not be imported (ModuleNotFoundError" in msg, msg
assert "backend='numpy'" in msg, msg
assert r1.backend == "numpy" and r2.backend == "numpy"
assert "NumPy oracle" in r1.summary()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    try:
        mlsem.fit(data, "y ~ x + (1 | k/j)", backend="cython")
    except mlsem.MlsemError as e:
        assert "could not be imported" in str(e)
    else:
        raise AssertionError("backend='cython' without the kernel must fail")
print("ok")
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_compiled_fit_records_its_backend():
    import mlsem
    res = mlsem.fit(mlsem.example_data(), "y ~ x + (1 | k/j)")
    assert res.backend == "cython"
    assert "NumPy oracle" not in res.summary()
