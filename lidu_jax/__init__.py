"""LiDu: List Distribution uncertainty for recommender systems, in JAX."""
