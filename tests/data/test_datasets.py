"""The data sets shipped with the package (mlsem.example_data(name))."""
import polars as pl
import pytest

import mlsem
from mlsem.data.simulate import DATASETS
from conftest import REF


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_shipped_dataset_loads(name):
    df = mlsem.example_data(name)
    assert df.height > 0 and df.width >= 3
    ref = REF / f"{name}.parquet"
    if ref.exists():  # the shipped copy is the reference case the tests use
        assert df.equals(pl.read_parquet(ref))


def test_unknown_dataset_names_the_choices():
    with pytest.raises(mlsem.MlsemError, match="no data set 'nope'.*sleepstudy"):
        mlsem.example_data("nope")


def test_default_example_is_the_seed_design():
    df = mlsem.example_data()
    assert df.shape == (400, 5) and df["k"].n_unique() == 100
