"""cli layer: the mlsem command (argument parsing, progress, file outputs)."""
