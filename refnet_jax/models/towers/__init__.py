"""Pretrained transformer towers as they are published: Hugging Face ViT, BERT, SigLIP and CLIP directories.

`load_tower(source, part)` reads a checkpoint into `Tower` (one Linen module whose fields cover these towers'
differences) with its parameters and its preprocessing; `save_tower(tower, DIR)` writes one back as a Hugging
Face directory; `PretrainedTower` is the ReFNet encoder `'pretrained'` built from one.
docs/how-to/towers-from-hugging-face.md shows them.
"""

from refnet_jax.models.towers.export import save_tower
from refnet_jax.models.towers.loader import LoadedTower, load_tower
from refnet_jax.models.towers.module import Tower

__all__ = ['LoadedTower', 'Tower', 'load_tower', 'save_tower']
