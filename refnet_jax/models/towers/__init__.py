"""Pretrained transformer towers as they are published: Hugging Face ViT, BERT, SigLIP and CLIP directories.

`load_tower(source, part)` reads a checkpoint into `Tower` (one Linen module whose fields cover these towers'
differences) with its parameters and its preprocessing; docs/how-to/towers-from-hugging-face.md shows it.
"""

from refnet_jax.models.towers.loader import LoadedTower, load_tower
from refnet_jax.models.towers.module import Tower

__all__ = ['LoadedTower', 'Tower', 'load_tower']
