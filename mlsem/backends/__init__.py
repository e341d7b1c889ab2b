"""backends: the Dask driver (data held by workers; the same model and optimiser)."""
