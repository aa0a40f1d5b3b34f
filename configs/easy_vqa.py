r"""ReFNet on easy-VQA (64x64 synthetic shapes + a question -> one of 13 answers).

Run (from the repository root):

  python train.py --config configs/easy_vqa.py --workdir runs/easy_vqa

Expected: test accuracy >= 0.99 in under 5 minutes on 2 CPU cores, data preparation included
(docs/results.md). The default fusion is `lowrank`.

The argument picks a variant (refnet_jax/config_lib.py), e.g.
`--config configs/easy_vqa.py:fusion=transformer,variant=baseline`:
  fusion=KIND (a name in refnet_jax.models.fusions.FUSIONS: config_lib.ARG_HELP lists them),
  variant=baseline|refiner|refnet|pretrain, tiny.
With a token-level fusion (its `inputs` are 'tokens') the image CNN gives its 4x4 grid as tokens, the question
goes through a transformer encoder, and the refiner's targets are `tokens`.
"""

import ml_collections

from refnet_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = config_lib.parse_arg(arg, default_fusion='lowrank')
    config = config_lib.base_config(opts, dataset='easy_vqa', modalities=('image', 'question'))
    config.data.questions_per_image = (
        8  # training batches encode each image once for this many of its questions
    )
    if config_lib.token_level(opts):  # a token-level fusion: both encoders give tokens
        encoders = {
            # The CNN's last 4x4 feature map as 16 grid tokens (as MMBT feeds a ResNet's grid features).
            'image': dict(module='cnn', features=(16, 32, 32, 32), embed_dim=64, pooling='tokens'),
            # A transformer over the question's word ids, padding masked.
            'question': dict(module='text_transformer', width=64, depth=1, num_heads=4),
        }
        config.model.fusion.fused_dim = 64
    else:
        encoders = {
            # The image CNN, pooled over positions: what is in the image matters, not where.
            'image': dict(module='cnn', features=(16, 32, 32, 32), embed_dim=128, pooling='max'),
            'question': dict(module='bow', embed_dim=128, use_positions=True),  # bag of word embeddings
        }
    config_lib.set_encoders(config, encoders)
    config.train.batch_size = 256  # questions per step (on batch_size / questions_per_image images)
    config.eval.batch_size = 768  # question slots per evaluation batch: 24 images x 32 slots

    if opts['tiny']:
        tiny = {
            'image': dict(module='cnn', features=(8, 8), embed_dim=16, pooling='max'),
            'question': dict(module='bow', embed_dim=16, use_positions=True),
        }
        if config_lib.token_level(opts):
            tiny = {
                'image': dict(module='cnn', features=(8, 8, 8), embed_dim=16, pooling='tokens'),
                'question': dict(module='text_transformer', width=16, depth=1, num_heads=2),
            }
        config_lib.make_tiny(config, encoders=tiny)
        config.eval.batch_size = 256
    return config
