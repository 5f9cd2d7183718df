"""meg_jax.rl"""
