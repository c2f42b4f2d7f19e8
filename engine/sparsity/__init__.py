"""2:4 structured sparsity: check, prune, channel permutation, compress, reference kernels."""
