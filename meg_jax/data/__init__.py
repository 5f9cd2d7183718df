"""meg_jax.data"""
