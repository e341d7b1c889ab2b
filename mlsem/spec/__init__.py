"""spec layer: formulas, lavaan syntax, relaxations -> the parameter table."""
