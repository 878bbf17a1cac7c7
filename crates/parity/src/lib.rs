//! Test support for parity with the official PyTorch code: the formula weight generator, fixture discovery and tolerance checks.
