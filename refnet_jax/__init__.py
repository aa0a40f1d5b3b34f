"""refnet_jax: Refiner Fusion Networks (ReFNet) in JAX/Flax."""

__version__ = '0.1.0'
