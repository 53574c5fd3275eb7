"""AST: the Adaptive Sparse Trainer (2:4 semi-structured sparse retraining), in JAX."""
