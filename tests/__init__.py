"""The test suite (pytest; CPU, tiny inputs, generated data)."""
