"""Using a model without training it."""
