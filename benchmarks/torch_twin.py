r"""The default easy-VQA train step next to an eager PyTorch twin of it: examples/s side by side, one run.

  python benchmarks/torch_twin.py [--steps 20] [--windows 5] [--warmup 5] [--repeats 3] [--json PATH]

Needs the `bench` extra (pip install -c constraints.txt -e '.[bench]'): torch (CPU build) and
pytorch-metric-learning. The configuration is `configs/easy_vqa.py` without argument (fusion=lowrank,
variant=refnet). Every side runs in its own process (`benchlib.run_worker`), so that the two never share a
heap or thread pools:

  prepare   one JAX process builds the run as `trainer.build` does, draws `--distinct-batches` real batches
            from `input_pipeline.make_train_iterator(config, seed=config.seed)`, and writes them, the
            initial parameters, the learning-rate schedule (optax's values, step by step), and the metrics
            of `--check-steps` real train steps (`run.train_step` on batches 0, 1, ...) and the parameters
            after them, to a temporary .npz.
  jax       ours: `trainer.build` and its jitted, donating train step (compiled ahead of the first call), fed
            the prepared batches already on the device, as `benchmarks/train_step.py --feed prefetched`.
  torch     the twin, eager PyTorch (no torch.compile), float32, `torch.set_num_threads` = usable CPUs
            (`--torch-threads`), fed the prepared batches already as torch tensors. It starts from *our*
            initial parameters, copied in; its first `--check-steps` steps are the check below, then the
            warm-up, then the timed windows.

Both timing workers run the same steps on the same batches: the first (timed alone: '1st step s'), the rest of
the `--check-steps`, `--warmup` untimed steps, then `--windows` timed windows of `--steps` steps, cycling over
the batches (so their last losses agree too, to float rounding). A JAX window ends with `block_until_ready` on
the state and metrics (eager torch on CPU has finished when its loop has). `--repeats` pairs of workers run
alternately (jax, torch, jax, torch, ...), so that a change of load hits both sides alike. The figure for each
side is the median examples/s over all its windows (min-max beside it); the ratio is ours over torch (> 1: ours
is faster). Measure on an idle machine (the header gives the load average): with another process busy on a
core, torch's OpenMP threads spin-wait on each other at every op, and the twin collapses (on 2 cores with one
kept busy: about 160 examples/s with 2 threads against 4,500 with 1, or 3,400 with 2 and
OMP_WAIT_POLICY=PASSIVE), far more than XLA's thread pool does.

The twin (`Twin`) is the same network, layer by layer: the image CNN (3x3 'SAME' convolutions 16-32-32-32,
ReLU, 2x2 max-pool after each; max over positions; Dense 128), each of the batch's images encoded once and its
row gathered to its questions by `image_index` as ReFNet does for a shared modality; the bag-of-words
question encoder (word + position embeddings, mean over the non-padding tokens, Dense-ReLU-Dense 128);
low-rank tensor fusion (rank 4, 128: one bias-free factor per modality over [e_m; 1], product, rank weights,
bias); the head (Dense 13); one refiner decoder per modality (Dense 256-ReLU-Dense 128) against the
stop-gradient `embedding` targets; and the unused `missing/<m>` stand-ins, which exist in ours too. Its
parameters carry our names (`encoders.image.Conv_0.weight` for `encoders/image/Conv_0/kernel`), so copying
ours in checks every name and shape. The loss is ours with the config's weights: softmax cross-entropy +
0.1 x (1 - cos) refiner loss per modality + 0.1 x pytorch-metric-learning's
`MultiSimilarityLoss(alpha=2, beta=50, base=0.5)` on the fused z, with the pairs of
`MultiSimilarityMiner(epsilon=0.1)` (the mapping of benchmarks/ms_loss.py). The optimizer is ours: global-norm
clipping at 1.0 (`clip_grad_norm_`), then AdamW (b1 0.9, b2 0.999, eps 1e-8) with weight decay 1e-4 on the
parameters `config.train.decay_mask` names (kernels, i.e. conv/linear weights; not biases, embeddings, position
embeddings, rank weights or stand-ins), its learning rate at each step optax's warm-up + cosine schedule
(`LambdaLR` over the values the prepare worker computed). Like ours, a step also returns the loss terms,
accuracy, global gradient norm, parameter norm and learning rate. `torch.optim.AdamW` runs with
`--torch-adamw` (default `fused`, the fastest of the three implementations on CPU).

Equivalence, checked by every torch worker before its timing (the script exits with an error when a check
fails): the twin's parameter count equals ours (the sum of the sizes of `state.params`; the two `missing/<m>`
stand-ins of 128 included); at each of the `--check-steps` steps, run from our initial parameters on the same
batches, its loss (the first one: the forward pass alone) and its global gradient norm (the backward pass:
stop-gradient targets, mining) equal ours to 1e-4 relative; and after those steps its parameters differ from
ours by at most 1e-3 of how far ours moved (the optimizer: clipping, AdamW, schedule; the first step's learning
rate is 0 in both, as optax's warm-up starts at 0). The last table shows these figures and the other loss terms.
Differences that remain:

- Clipping: torch scales by max_norm / (norm + 1e-6), optax by max_norm / norm, when norm > max_norm.
- MS loss: pytorch-metric-learning returns 0 outright when at most one positive and one negative pair survive
  mining in the whole batch (never at B=256 with 13 classes); its miner computes its own similarity matrix
  (without gradient), sorts every row twice and hands index lists to the loss, which builds its masks from
  them, where ours mines on the loss's one matrix with masks; that is how the library works, and part of the
  twin's cost.
- The stand-ins are unused in both: ours computes a zero gradient for them and optax moves them by zero;
  torch leaves their gradient None and AdamW skips them.
- The default config has no dropout, so neither step draws random numbers (ours folds its key, unused).
- The images enter the twin's convolutions as the NHWC batch permuted to an NCHW view (channels-last memory,
  which oneDNN runs about a third faster here than contiguous NCHW); ours keeps NHWC, XLA's CPU layout.
- Ours is one jitted XLA program with the state donated; the twin is eager PyTorch, one kernel per op.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

import benchlib
import numpy as np

from refnet_jax.analysis import report

CONFIG = 'configs/easy_vqa.py'  # its default: fusion=lowrank, variant=refnet
SIDES = ('jax', 'torch')
ADAMW = ('fused', 'foreach', 'for-loop')
METRICS = ('loss', 'task_loss', 'refiner_loss/image', 'refiner_loss/question', 'ms_loss', 'grad_norm')
ASSERTED = ('loss', 'grad_norm')  # at every check step, relative difference at most RTOL
RTOL = 1e-4
PARAM_RTOL = 1e-3  # |twin - ours| / |ours after - ours before|, parameters after the check steps


# ----------------------------------------------------------------------------------------------- prepare


def check_config(config) -> None:
    """Refuses a config the twin does not implement (it is the default easy-VQA refnet config only)."""
    enc, fus, loss, train = config.model.encoders, config.model.fusion, config.loss, config.train
    expected = {
        'encoders.image': (
            enc.image.module,
            enc.image.pooling,
            tuple(enc.image.features),
            enc.image.embed_dim,
        ),
        'encoders.question': (enc.question.module, enc.question.use_positions, enc.question.embed_dim),
        'fusion': (fus.kind, fus.rank, fus.fused_dim),
        'refiner': (config.model.refiner.target, config.model.refiner.stop_gradient_target),
        'dtype': (config.model.dtype, config.model.param_dtype),
        'ms': (loss.ms.mining, loss.ms_weight > 0),
        'train': (tuple(train.frozen), tuple(train.lr_multipliers), train.accumulation_steps),
        'dropout': tuple(train.modality_dropout.values()),
    }
    want = {
        'encoders.image': ('cnn', 'max', (16, 32, 32, 32), 128),
        'encoders.question': ('bow', True, 128),
        'fusion': ('lowrank', 4, 128),
        'refiner': ('embedding', True),
        'dtype': ('float32', 'float32'),
        'ms': (True, True),
        'train': ((), (), 1),
        'dropout': (0.0, 0.0),
    }
    wrong = {k: v for k, v in expected.items() if v != want[k]}
    if wrong:
        raise SystemExit(
            f'the twin implements {CONFIG} as it was written; these differ now: {wrong} != {want}'
        )


def prepare_worker(args) -> dict:
    """Our run's initial parameters, batches, schedule and first steps' metrics, written to `args.data`."""
    import jax

    from refnet_jax.data import contract, input_pipeline
    from refnet_jax.train import paths, trainer

    config = benchlib.load_config(CONFIG)
    check_config(config)
    config.mesh.data = 1
    run = trainer.build(config, devices=jax.devices()[:1])
    arrays = {}
    for keys, leaf in jax.tree_util.tree_leaves_with_path(run.state.params):
        arrays[f'param/{paths.path_str(keys)}'] = np.array(leaf, copy=True)  # before the state is donated
    params = sum(a.size for k, a in arrays.items() if k.startswith('param/'))
    train_iter = input_pipeline.make_train_iterator(config, seed=config.seed)
    batches = [next(train_iter) for _ in range(args.distinct_batches)]
    for i, batch in enumerate(batches):
        contract.check_batch(batch, run.info)
        arrays.update({f'batch{i}/{k}': np.asarray(v) for k, v in batch.items()})
    steps = np.arange(config.train.num_steps + 1)
    arrays['lr_schedule'] = np.asarray(jax.lax.map(run.schedule, steps), np.float64)  # step by step

    _, step_rng = trainer.init_rngs(config)
    state, reference = run.state, []
    with jax.set_mesh(run.mesh):
        for i in range(args.check_steps):
            batch = jax.device_put(batches[i % len(batches)])
            state, metrics = run.train_step(state, batch, step_rng)
            reference.append({k: float(v) for k, v in metrics.items()})
        for keys, leaf in jax.tree_util.tree_leaves_with_path(state.params):
            arrays[f'after/{paths.path_str(keys)}'] = np.array(leaf, copy=True)
    meta = {
        'params': int(params),
        'num_classes': run.info.num_classes,
        'vocab_size': run.info.modalities['question'].vocab_size,
        'batch_size': config.train.batch_size,
        'distinct_batches': len(batches),
        'reference': reference,
    }
    np.savez(args.data, meta=np.array(json.dumps(meta)), **arrays)
    return meta


def load_prepared(path: str) -> dict:
    """What `prepare_worker` wrote: `meta`, `params` and `after` (ours initially and after the check steps, by
    our path), `batches` and `lr_schedule` (the learning rate of each step)."""
    with np.load(path) as f:
        meta = json.loads(str(f['meta']))
        by_path = {
            group: {k.split('/', 1)[1]: f[k] for k in f.files if k.startswith(f'{group}/')}
            for group in ('param', 'after')
        }
        batches = [
            {k.split('/', 1)[1]: f[k] for k in f.files if k.startswith(f'batch{i}/')}
            for i in range(meta['distinct_batches'])
        ]
        return {
            'meta': meta,
            'params': by_path['param'],
            'after': by_path['after'],
            'batches': batches,
            'lr_schedule': f['lr_schedule'],
        }


# ----------------------------------------------------------------------------------------------- timing


def time_windows(step, args, after_check=None) -> dict:
    """The steps of a timing worker, the same on both sides: the first step (timed alone), the rest of the
    `args.check_steps` (batches 0, 1, ..., as the prepare worker ran them), then `after_check()`,
    `args.warmup` untimed steps and `args.windows` timed windows of `args.steps`. `step(n)` runs the next n
    steps on the next batches and returns once they are done."""
    start = time.perf_counter()
    step(1)
    first_step_s = time.perf_counter() - start
    step(args.check_steps - 1)
    if after_check is not None:
        after_check()
    step(args.warmup)
    windows = []
    for _ in range(args.windows):
        start = time.perf_counter()
        step(args.steps)
        windows.append(time.perf_counter() - start)
    return {'first_step_s': first_step_s, 'window_s': windows}


def jax_worker(args) -> dict:
    import jax

    from refnet_jax.train import sharding, trainer

    baseline = benchlib.current_rss()
    config = benchlib.load_config(CONFIG)
    config.mesh.data = 1
    run = trainer.build(config, devices=jax.devices()[:1])
    batches = load_prepared(args.data)['batches']
    state = run.state
    params = sum(x.size for x in jax.tree.leaves(state.params))
    with jax.set_mesh(run.mesh):
        _, step_rng = trainer.init_rngs(config)
        device_batches = jax.block_until_ready([sharding.shard_batch(b, run.mesh) for b in batches])
        start = time.perf_counter()
        compiled = run.train_step.lower(state, device_batches[0], step_rng).compile()
        compile_s = time.perf_counter() - start
        count, metrics = 0, None

        def step(n: int) -> None:
            nonlocal state, metrics, count
            for _ in range(n):
                state, metrics = compiled(state, device_batches[count % len(device_batches)], step_rng)
                count += 1
            jax.block_until_ready((state, metrics))

        timing = time_windows(step, args)
    return {
        'side': 'jax',
        'params': int(params),
        'compile_s': compile_s,
        **timing,
        'peak_mb': (benchlib.peak_rss() - baseline) / benchlib.MB,
        'last_loss': float(metrics['loss']),
    }


# ----------------------------------------------------------------------------------------------- the twin


def build_twin(config, meta: dict):
    """The torch modules of the default easy-VQA ReFNet (see the docstring), parameters named as ours."""
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    enc = config.model.encoders

    class ImageCNN(nn.Module):
        def __init__(self, features, embed_dim):
            super().__init__()
            widths = (3, *features)
            for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
                self.add_module(f'Conv_{i}', nn.Conv2d(a, b, 3, padding=1))  # 'SAME' for 3x3, stride 1
            self.Dense_0 = nn.Linear(features[-1], embed_dim)
            self.num_convs = len(features)

        def forward(self, images):  # (N, H, W, C) uint8
            x = (images.to(torch.float32) / 255.0).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
            for i in range(self.num_convs):
                x = F.max_pool2d(F.relu(getattr(self, f'Conv_{i}')(x)), 2, 2)
            return self.Dense_0(x.amax(dim=(2, 3)))  # max over positions

    class TokenEncoder(nn.Module):
        def __init__(self, vocab_size, length, embed_dim):
            super().__init__()
            self.Embed_0 = nn.Embedding(vocab_size, embed_dim)
            self.positions = nn.Parameter(torch.zeros(length, embed_dim))
            self.Dense_0 = nn.Linear(embed_dim, embed_dim)
            self.Dense_1 = nn.Linear(embed_dim, embed_dim)

        def forward(self, tokens):  # (B, L) ids, 0 = padding
            x = self.Embed_0(tokens) + self.positions
            keep = (tokens != 0).unsqueeze(-1)
            x = x.masked_fill(~keep, 0.0).sum(1) / keep.sum(1).clamp(min=1).to(x.dtype)
            # Ours is `Dense(Dense(x))` written inline: Flax names the outer one, constructed first, Dense_0.
            return self.Dense_0(F.relu(self.Dense_1(x)))

    class LowRankFusion(nn.Module):
        def __init__(self, dims, rank, fused_dim):
            super().__init__()
            for i, d in enumerate(dims):
                self.add_module(f'factor_{i}', nn.Linear(d + 1, rank * fused_dim, bias=False))
            self.rank_weights = nn.Parameter(torch.zeros(1, rank))
            self.bias = nn.Parameter(torch.zeros(fused_dim))
            self.rank, self.fused_dim, self.count = rank, fused_dim, len(dims)

        def forward(self, embeddings):  # sorted by modality name
            prod = None
            for i, x in enumerate(embeddings):
                x1 = torch.cat([x, torch.ones_like(x[:, :1])], dim=-1)
                f = getattr(self, f'factor_{i}')(x1).view(-1, self.rank, self.fused_dim)
                prod = f if prod is None else prod * f
            return torch.einsum('brd,or->bd', prod, self.rank_weights) + self.bias

    class Decoder(nn.Module):
        def __init__(self, in_dim, hidden, out_dim):
            super().__init__()
            widths = (in_dim, *hidden)
            for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
                self.add_module(f'Dense_{i}', nn.Linear(a, b))
            self.add_module(f'Dense_{len(hidden)}', nn.Linear(widths[-1], out_dim))
            self.depth = len(hidden) + 1

        def forward(self, z):
            for i in range(self.depth - 1):
                z = F.relu(getattr(self, f'Dense_{i}')(z))
            return getattr(self, f'Dense_{self.depth - 1}')(z)

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            fused = config.model.fusion.fused_dim
            dims = {'image': enc.image.embed_dim, 'question': enc.question.embed_dim}
            self.names = sorted(dims)
            self.encoders = nn.ModuleDict(
                {
                    'image': ImageCNN(tuple(enc.image.features), enc.image.embed_dim),
                    'question': TokenEncoder(meta['vocab_size'], meta['question_length'], dims['question']),
                }
            )
            self.fusion = LowRankFusion([dims[m] for m in self.names], config.model.fusion.rank, fused)
            self.head = nn.Linear(fused, meta['num_classes'])
            self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(dims[m])) for m in self.names})
            hidden = tuple(config.model.refiner.hidden)
            self.refined = [m for m in self.names if config.loss.refiner_weights[m] > 0]
            self.refiner = nn.ModuleDict({m: Decoder(fused, hidden, dims[m]) for m in self.refined})

        def forward(self, batch):
            # A shared modality: each image encoded once, its row gathered to its questions.
            images = self.encoders['image'](batch['image'])[batch['image_index']]
            embeddings = {'image': images, 'question': self.encoders['question'](batch['question'])}
            z = self.fusion([embeddings[m] for m in self.names])
            aux = {'embeddings': embeddings, 'fused': z}
            targets = {m: embeddings[m].detach() for m in self.refined}  # stop_gradient_target
            aux['reconstructions'] = {m: self.refiner[m](z) for m in self.refined}
            aux['targets'] = targets
            return self.head(z), aux

    return Twin()


def torch_name(path: str) -> str:
    """Our parameter path -> the twin's parameter name: 'encoders/image/Conv_0/kernel' ->
    'encoders.image.Conv_0.weight'."""
    *parents, leaf = path.split('/')
    return '.'.join([*parents, {'kernel': 'weight', 'embedding': 'weight'}.get(leaf, leaf)])


def to_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
    """Our parameter in the twin's layout: conv HWIO -> OIHW, dense (in, out) -> (out, in), the low-rank
    factors (in, rank, out) -> (rank * out, in); everything else as it is."""
    if path.endswith('/kernel'):
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)
        return value.reshape(value.shape[0], -1).T
    return value


def load_ours(model, params: dict[str, np.ndarray]) -> None:
    """Copies our parameters into the twin; fails on any name or shape that does not match."""
    import torch

    named = dict(model.named_parameters())
    want = {torch_name(p): p for p in params}
    if set(named) != set(want):
        raise SystemExit(
            'the twin and ours have different parameters: only ours '
            f'{sorted(set(want) - set(named))}, only the twin {sorted(set(named) - set(want))}'
        )
    with torch.no_grad():
        for name, path in want.items():
            value = to_torch_layout(path, params[path])
            if tuple(named[name].shape) != value.shape:
                raise SystemExit(
                    f'{path} {value.shape} in the twin layout, but {name} is {named[name].shape}'
                )
            named[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))


def torch_worker(args) -> dict:
    import torch
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
    from torch.nn import functional as F  # noqa: N812

    threads = args.torch_threads or report.usable_cpus()
    torch.set_num_threads(threads)
    (torch.ones(2, requires_grad=True) * 2).sum().backward()  # autograd start-up is not the step's memory
    baseline = benchlib.current_rss()

    config = benchlib.load_config(CONFIG)
    check_config(config)
    prepared = load_prepared(args.data)
    meta, ours, host_batches, lr_schedule = (
        prepared[k] for k in ('meta', 'params', 'batches', 'lr_schedule')
    )
    meta['question_length'] = host_batches[0]['question'].shape[1]
    model = build_twin(config, meta)
    load_ours(model, ours)
    params = sum(p.numel() for p in model.parameters())
    names = {torch_name(p): p for p in ours}
    # The same real batches, prefetched as torch tensors (int64 ids: torch's index type).
    batches = [
        {
            k: torch.from_numpy(v) if v.dtype == np.uint8 else torch.from_numpy(v.astype(np.int64))
            for k, v in b.items()
        }
        for b in host_batches
    ]

    t = config.train
    decay_res = [re.compile(p) for p in t.decay_mask]
    groups = {True: [], False: []}
    for name, p in model.named_parameters():
        groups[any(r.fullmatch(names[name]) for r in decay_res)].append(p)
    impl = {'fused': {'fused': True}, 'foreach': {'foreach': True}, 'for-loop': {'foreach': False}}
    optimizer = torch.optim.AdamW(
        [
            {'params': groups[True], 'weight_decay': t.weight_decay},
            {'params': groups[False], 'weight_decay': 0.0},
        ],
        lr=t.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
        **impl[args.torch_adamw],
    )
    last = len(lr_schedule) - 1  # optax's schedule holds its last value after num_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: float(lr_schedule[min(step, last)]) / t.learning_rate
    )
    ms_cfg = config.loss.ms
    ms_loss = pml_losses.MultiSimilarityLoss(alpha=ms_cfg.alpha, beta=ms_cfg.beta, base=ms_cfg.base)
    miner = pml_miners.MultiSimilarityMiner(epsilon=ms_cfg.epsilon)
    all_params = list(model.parameters())

    def refiner_loss(recon, target):
        if config.loss.refiner_kind == 'cosine':
            return (1.0 - (F.normalize(recon, dim=1) * F.normalize(target, dim=1)).sum(1)).mean()
        return (recon - target).square().mean(1).mean()

    def train_step(batch) -> dict:
        optimizer.zero_grad(set_to_none=True)
        logits, aux = model(batch)
        labels = batch['label']
        task = F.cross_entropy(logits, labels)
        metrics = {'task_loss': task.detach()}
        loss = task
        for m, recon in aux['reconstructions'].items():
            value = refiner_loss(recon, aux['targets'][m])
            metrics[f'refiner_loss/{m}'] = value.detach()
            loss = loss + config.loss.refiner_weights[m] * value
        z = aux['fused']
        ms = ms_loss(z, labels, miner(z, labels))
        metrics['ms_loss'] = ms.detach()
        loss = loss + config.loss.ms_weight * ms
        loss.backward()
        with torch.no_grad():
            metrics['param_norm'] = torch.nn.utils.get_total_norm(all_params)
        if t.grad_clip_norm > 0:
            metrics['grad_norm'] = torch.nn.utils.clip_grad_norm_(all_params, t.grad_clip_norm)
        else:
            metrics['grad_norm'] = torch.nn.utils.get_total_norm(
                [p.grad for p in all_params if p.grad is not None]
            )
        metrics['learning_rate'] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        metrics.update(loss=loss.detach(), accuracy=(logits.argmax(-1) == labels).float().mean())
        return metrics

    count, metrics, check, moved = 0, None, [], {}

    def step(n: int) -> None:
        nonlocal count, metrics
        for _ in range(n):
            metrics = train_step(batches[count % len(batches)])
            if count < args.check_steps:
                check.append({k: float(v) for k, v in metrics.items()})
            count += 1

    def parameter_check() -> None:
        """The optimizer's check: the twin's parameters after the check steps against ours, relative to how
        far ours moved in those steps."""
        named = dict(model.named_parameters())
        diff = change = 0.0
        for path, after in prepared['after'].items():
            twin = named[torch_name(path)].detach().numpy().astype(np.float64)
            after = to_torch_layout(path, after).astype(np.float64)
            diff += np.sum(np.square(twin - after))
            change += np.sum(np.square(after - to_torch_layout(path, ours[path]).astype(np.float64)))
        moved['param_diff_over_change'] = float(np.sqrt(diff / change)) if change > 0 else None

    timing = time_windows(step, args, parameter_check)
    return {
        'side': 'torch',
        'params': int(params),
        'threads': torch.get_num_threads(),
        'interop_threads': torch.get_num_interop_threads(),
        'adamw': args.torch_adamw,
        'check': check,
        **moved,
        **timing,
        'peak_mb': (benchlib.peak_rss() - baseline) / benchlib.MB,
        'last_loss': float(metrics['loss']),
    }


# ----------------------------------------------------------------------------------------------- parent


def relative_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def check_equivalence(prepared: dict, result: dict) -> dict:
    """The twin's parameter count, check-step metrics and parameters after the check steps against ours;
    exits on a failed check."""
    if result['params'] != prepared['params']:
        raise SystemExit(
            f'parameter count: twin {result["params"]:,}, ours {prepared["params"]:,}: not the same'
        )
    steps = []
    for i, (ours, twin) in enumerate(zip(prepared['reference'], result['check'], strict=True)):
        steps.append(
            {
                'step': i,
                **{
                    k: {'ours': ours[k], 'twin': twin[k], 'rel': relative_diff(twin[k], ours[k])}
                    for k in METRICS
                },
            }
        )
    failed = [
        f'step {row["step"]} {k}: twin {row[k]["twin"]:.8g}, ours {row[k]["ours"]:.8g} '
        f'(relative difference {row[k]["rel"]:.2e} > {RTOL:g})'
        for row in steps
        for k in ASSERTED
        if not row[k]['rel'] <= RTOL
    ]
    moved = result['param_diff_over_change']
    if moved is not None and not moved <= PARAM_RTOL:
        failed.append(
            f'parameters after the check steps: |twin - ours| / |ours moved| = {moved:.2e} > {PARAM_RTOL:g}'
        )
    if failed:
        raise SystemExit('the twin does not compute what ours does:\n' + '\n'.join(failed))
    return {'params': result['params'], 'steps': steps, 'param_diff_over_change': moved}


def side_summary(results: list[dict], batch_size: int, steps: int) -> dict:
    """Median, min and max examples/s over every window of every worker of one side."""
    rates = [steps * batch_size / w for r in results for w in r['window_s']]
    return {
        'examples_per_s': statistics.median(rates),
        'examples_per_s_min': min(rates),
        'examples_per_s_max': max(rates),
        'ms_per_step': statistics.median(w for r in results for w in r['window_s']) / steps * 1e3,
        'windows': len(rates),
        'workers': len(results),
    }


def tables(summary: dict, results: list[dict], equivalence: dict, args) -> str:
    rows = []
    for side in SIDES:
        s = summary[side]
        mine = [r for r in results if r['side'] == side]
        first = statistics.median(r['first_step_s'] for r in mine)
        peak = statistics.median(r['peak_mb'] for r in mine)
        if side == 'jax':
            what = f'jitted XLA step (compile {statistics.median(r["compile_s"] for r in mine):.2f} s, not timed)'
        else:
            what = f'eager torch, {mine[0]["threads"]} threads, AdamW {mine[0]["adamw"]}'
        rows.append(
            [
                'ours (JAX)' if side == 'jax' else 'torch twin',
                f'{mine[0]["params"]:,}',
                f'{first:.2f}',
                f'{s["ms_per_step"]:.1f}',
                f'{s["examples_per_s"]:,.0f}',
                f'{s["examples_per_s_min"]:,.0f}–{s["examples_per_s_max"]:,.0f}',
                f'{s["windows"]} ({s["workers"]} × {args.windows})',
                f'{peak:.0f}',
                what,
            ]
        )
    main = report.markdown_table(
        [
            'side',
            'params',
            '1st step s',
            'ms/step',
            'examples/s',
            'min–max examples/s',
            'windows',
            'peak MB',
            'how',
        ],
        rows,
    )
    worker_rows = []
    for r in results:
        s = side_summary([r], summary['batch_size'], args.steps)
        worker_rows.append(
            [
                r['repeat'],
                r['side'],
                f'{s["examples_per_s"]:,.0f}',
                f'{s["examples_per_s_min"]:,.0f}–{s["examples_per_s_max"]:,.0f}',
                f'{r["last_loss"]:.4f}',
            ]
        )
    per_worker = report.markdown_table(
        ['repeat', 'side', 'median examples/s', 'min–max examples/s', 'last loss'], worker_rows
    )
    check_rows = []
    for row in equivalence['steps']:
        for k in METRICS:
            v = row[k]
            check_rows.append([row['step'], k, f'{v["ours"]:.7g}', f'{v["twin"]:.7g}', f'{v["rel"]:.1e}'])
    moved = equivalence['param_diff_over_change']
    if moved is not None:
        check_rows.append(
            [
                f'after {len(equivalence["steps"])}',
                'parameters: norm(twin - ours) / norm(ours moved)',
                '',
                '',
                f'{moved:.1e}',
            ]
        )
    check = report.markdown_table(['step', 'metric', 'ours', 'twin', 'relative difference'], check_rows)
    return (
        f'{main}\n\nPer worker:\n\n{per_worker}\n\nEquivalence (the first torch worker; every one is checked: '
        f'{", ".join(ASSERTED)} to {RTOL:g}, parameters to {PARAM_RTOL:g}):\n\n{check}'
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--steps', type=int, default=20, help='steps per timed window')
    parser.add_argument('--windows', type=int, default=5, help='timed windows per worker')
    parser.add_argument(
        '--warmup', type=int, default=5, help='untimed steps after the check steps, per worker'
    )
    parser.add_argument('--repeats', type=int, default=3, help='jax/torch worker pairs, run alternately')
    parser.add_argument('--distinct-batches', type=int, default=8, help='real batches cycled over')
    parser.add_argument('--check-steps', type=int, default=3, help='steps compared, twin against ours')
    parser.add_argument('--torch-threads', type=int, default=0, help='torch.set_num_threads (0: usable CPUs)')
    parser.add_argument(
        '--torch-adamw', choices=ADAMW, default='fused', help="torch.optim.AdamW's implementation"
    )
    benchlib.add_run_flags(parser, timeout=1800.0)
    parser.add_argument('--role', choices=('prepare', *SIDES), help=argparse.SUPPRESS)
    parser.add_argument('--data', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        workers = {'prepare': prepare_worker, 'jax': jax_worker, 'torch': torch_worker}
        benchlib.emit_result(workers[args.role](args))
        return
    if (
        min(args.steps, args.windows, args.repeats, args.distinct_batches, args.check_steps) < 1
        or args.warmup < 0
    ):
        parser.error('--steps, --windows, --repeats, --distinct-batches and --check-steps must be >= 1')
    import importlib.util

    if (
        importlib.util.find_spec('torch') is None
        or importlib.util.find_spec('pytorch_metric_learning') is None
    ):
        raise SystemExit(
            "torch and pytorch-metric-learning are needed: pip install -c constraints.txt -e '.[bench]'"
        )

    script = os.path.abspath(__file__)
    run = benchlib.Run.start(
        'torch_twin', ['jax', 'jaxlib', 'flax', 'optax', 'torch', 'pytorch-metric-learning', 'numpy']
    )
    flags = [
        f'--{k}={getattr(args, k.replace("-", "_"))}'
        for k in (
            'steps',
            'windows',
            'warmup',
            'distinct-batches',
            'check-steps',
            'torch-threads',
            'torch-adamw',
        )
    ]
    with tempfile.TemporaryDirectory(prefix='torch_twin_') as tmp:
        data = os.path.join(tmp, 'prepared.npz')
        print(f'{CONFIG}: preparing batches, parameters and reference steps ...', file=sys.stderr, flush=True)
        prepared = benchlib.run_worker(
            script, ['--role=prepare', f'--data={data}', *flags], timeout=args.timeout
        )
        if 'error' in prepared:
            raise SystemExit(f'prepare worker failed: {prepared["error"]}')
        results, equivalence = [], None
        for repeat in range(args.repeats):
            for side in SIDES:
                print(f'repeat {repeat + 1}/{args.repeats}: {side} ...', file=sys.stderr, flush=True)
                result = benchlib.run_worker(
                    script, [f'--role={side}', f'--data={data}', *flags], timeout=args.timeout
                )
                if 'error' in result:
                    raise SystemExit(f'{side} worker failed: {result["error"]}')
                if result['params'] != prepared['params']:
                    raise SystemExit(
                        f'parameter count: {side} worker {result["params"]:,}, ours {prepared["params"]:,}'
                    )
                if side == 'torch':
                    checked = check_equivalence(prepared, result)
                    equivalence = equivalence or checked
                results.append({'repeat': repeat + 1, **result})
    run.finish()

    batch_size = prepared['batch_size']
    summary = {
        side: side_summary([r for r in results if r['side'] == side], batch_size, args.steps)
        for side in SIDES
    }
    summary['batch_size'] = batch_size
    summary['ratio_ours_over_torch'] = summary['jax']['examples_per_s'] / summary['torch']['examples_per_s']

    print(run.header())
    print(
        f'\n`{CONFIG}` (fusion=lowrank, variant=refnet) train step, batch {batch_size}, float32: ours against an '
        f'eager PyTorch twin with the same layers, losses, optimizer and parameters ({prepared["params"]:,}; the '
        f'first-step loss agrees to {equivalence["steps"][0]["loss"]["rel"]:.1e}). Each side in its own process, '
        f'{args.repeats} alternating pairs; per worker {args.warmup} warm-up steps, then {args.windows} windows '
        f'of {args.steps} steps over {args.distinct_batches} prefetched real batches; median over all windows.\n'
    )
    print(tables(summary, results, equivalence, args))
    print(
        f'\nRatio ours / torch twin (median examples/s): **{summary["ratio_ours_over_torch"]:.2f}×** '
        f'({summary["jax"]["examples_per_s"]:,.0f} vs {summary["torch"]["examples_per_s"]:,.0f}).'
    )
    if args.json:
        run.write_json(
            args.json,
            args,
            {'prepared': prepared, 'workers': results, 'equivalence': equivalence, 'summary': summary},
            hidden=('role', 'data'),
        )


if __name__ == '__main__':
    main()
