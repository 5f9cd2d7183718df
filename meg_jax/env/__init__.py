"""meg_jax.env"""
