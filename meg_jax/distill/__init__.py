"""meg_jax.distill"""
