"""meg_jax.meg"""
