"""Id columns of every integer type give the same fit.  An UInt64 id column crashed
the fit (IndexError: NumPy made the unsigned id times the int64 key a float64)."""
import polars as pl
import pytest

import mlsem


@pytest.fixture(scope="module")
def base():
    return mlsem.fit(mlsem.example_data(), "y ~ x + (1 | k/j)").loglik


@pytest.mark.parametrize("dtype", [pl.Int8, pl.Int16, pl.Int32, pl.Int64,
                                   pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64])
def test_integer_ids(base, dtype):
    d = mlsem.example_data().with_columns(pl.col("k").cast(dtype), pl.col("j").cast(dtype))
    assert mlsem.fit(d, "y ~ x + (1 | k/j)").loglik == pytest.approx(base, rel=1e-10)


def test_uint64_ids_beyond_int64(base):
    d = mlsem.example_data().with_columns(pl.col("k").cast(pl.UInt64) + (2**63 + 5),
                                          pl.col("j").cast(pl.UInt64) * (2**62))
    assert mlsem.fit(d, "y ~ x + (1 | k/j)").loglik == pytest.approx(base, rel=1e-10)


def test_negative_ids(base):
    d = mlsem.example_data().with_columns(-pl.col("k") - 1000, -pl.col("j"))
    assert mlsem.fit(d, "y ~ x + (1 | k/j)").loglik == pytest.approx(base, rel=1e-10)
