r"""Supervised ReFNet training.

  python train.py --config configs/easy_vqa.py --workdir runs/easy_vqa [--config.train.num_steps=...]

Everything happens in `refnet_jax.train_lib.train_and_evaluate`; this file only names it.
"""

from refnet_jax import cli, train_lib

if __name__ == '__main__':
    cli.run_experiment(train_lib.train_and_evaluate)
