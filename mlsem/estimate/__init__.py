"""estimate layer: start values, optimisers (ML, REML), information matrices."""
