r"""Self-supervised ReFNet pre-training: the refiner loss alone, on every training input (no labels).

  python pretrain.py --config configs/easy_vqa.py:variant=pretrain --workdir runs/vqa_pretrain
  python train.py --config configs/easy_vqa.py --workdir runs/vqa_finetune \
      --config.model.refiner.target=input --config.init_from=runs/vqa_pretrain

Everything happens in `refnet_jax.train.trainer.pretrain`; this file only names it.
"""

from refnet_jax import cli
from refnet_jax.train import trainer

if __name__ == '__main__':
    cli.run_experiment(trainer.pretrain)
