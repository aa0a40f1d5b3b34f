r"""Supervised ReFNet training.

  python train.py --config configs/easy_vqa.py --workdir runs/easy_vqa [--config.train.num_steps=...]

Everything happens in `refnet_jax.train.trainer.train_and_evaluate`; this file only names it.
"""

from refnet_jax import cli
from refnet_jax.train import trainer

if __name__ == '__main__':
    cli.run_experiment(trainer.train_and_evaluate)
