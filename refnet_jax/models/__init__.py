"""Models: the Linen modules of a ReFNet, and `create_model`, which turns a config into one.

- `layers`: transformer blocks, `Tokens` (token sequences with their mask), pooling and precision helpers.
- `encoders`: unimodal encoders (CNN, ViT, text transformer, bag of words, series, features).
- `fusion`: the fusion registry `FUSIONS`; pooled fusions here, `deq` and `coupled_mamba` in their own modules.
- `refiner`: the per-modality decoders that map the fused embedding back to each modality.
- `model`: `ReFNet` (encoders -> fusion -> head, plus the refiner) and `create_model`.
- `modules`: how a config names a module (a built-in name, `FILE.py:Class` or `package.module:Class`).
"""
