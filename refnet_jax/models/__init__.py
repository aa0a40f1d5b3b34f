"""Models: the Linen modules of a ReFNet, and `create_model`, which turns a config into one.

- `layers`: transformer blocks, `Tokens` (token sequences with their mask), pooling and precision helpers.
- `encoders`: unimodal encoders (CNN, ViT, text transformer, bag of words, series, features).
- `fusions`: one module per fusion, the registry `FUSIONS` found from them, and `FusionOutput`, what every
  fusion returns (the package docstring states a fusion's contract).
- `refiner`: the refiner's targets (`refiner_targets`) and the per-modality decoders that map the fused
  embedding back to each modality.
- `model`: `ReFNet` (encoders -> fusion -> head, plus the refiner) and `create_model`.
- `modules`: how a config names a module (a built-in name, `FILE.py:Class` or `package.module:Class`).
"""
