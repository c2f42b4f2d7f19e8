"""The NumPy reference backend: runs every op exactly; the oracle for all tests."""

from engine.backends.numpy_ref.interpreter import (
    InputError,
    NodeExecutionError,
    ReferenceInterpreter,
    RunResult,
    run_model,
)

__all__ = ["InputError", "NodeExecutionError", "ReferenceInterpreter", "RunResult", "run_model"]
