"""Execution backends: numpy_ref (the oracle) and, later, cuda."""
