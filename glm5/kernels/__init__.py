"""Optional fast kernels. Each has a pure-torch fallback with the same signature and a parity test."""
