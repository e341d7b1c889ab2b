"""model layer: parameter table -> matrices, the kernel (_core.pyx) and its NumPy oracle, the chain rule."""
