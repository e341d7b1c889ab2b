"""results layer: the fitted model's tables, predictions, diagrams, export."""
