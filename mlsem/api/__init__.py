"""api layer: fit(), sem(), multilevel(): validation of user arguments, frozen fit options, the pipeline."""
