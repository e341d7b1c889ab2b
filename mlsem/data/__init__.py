"""data layer: read, validate, nested -> wide slots, missing patterns (Polars)."""
