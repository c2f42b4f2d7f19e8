"""The CUDA backend (issue 9), its foundation: NVRTC compile + cache, kernels, pointwise
codegen, the compile check and the CPU shim runner. Nothing here imports cupy or an NVRTC
binding at import time; see README.md in this folder for what exists and what is missing."""
