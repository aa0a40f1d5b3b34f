"""Starting parameters from elsewhere: the one mechanism behind `config.init_from` (a whole run) and
`config.model.encoders.<m>.init_from` / `config.model.fusion.init_from` (single modules).

A source is one of
- `PATH.npz[:sub/tree]`: a NumPy archive of '/'-joined parameter names (big_vision's checkpoint layout;
  a leading `params/` is dropped), optionally one subtree of it (`:img` takes the image tower of a SigLIP
  two-tower file);
- a refnet workdir `DIR[:sub/tree]`: the parameters of its latest checkpoint; by default the same module
  (`encoders/<m>` or `fusion`) of it, or the named subtree (`runs/x:encoders/image` into another modality);
- an orbax checkpoint directory `DIR[:sub/tree]` (a step of a CheckpointManager, or a PyTree checkpoint)
  holding a tree of parameters (under `params/` or `state/params/` too);
- `hf:DIR`, a Hugging Face tower directory, for an encoder of module 'pretrained' built from it (and its
  `part`): `refnet_jax.models.towers` converts its tensors to the encoder's names.

`config.init_from = DIR` (a refnet workdir, typically a pre-training run) is the same as giving every
top-level module that both the run and DIR have (encoders, fusion, refiner, the stand-ins of absent modalities;
never the task head) `init_from = DIR`; a module's own `init_from` then overrides it for that module.

`config.model.init_rename` ((regex, replacement) pairs, `re.sub` on the source's names) maps another layout's
names to this library's. Every parameter the module expects and the source lacks, every extra one and every
shape mismatch is an error naming the path and both shapes, before training; a ViT's `pos_embedding` of
another patch grid is resampled (big_vision's `resample_posemb`: bilinear on the grid), and an encoder's
`head` of another shape (another class count) is left at its initialization. The log lists what was loaded
from where. Arrays are put on each parameter's current sharding, so any mesh and device count works, and the
optimizer state of the loaded parameters starts fresh (`init_modules`).
"""

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from refnet_jax.models.towers import big_vision
from refnet_jax.train import paths


def module_sources(config: ml_collections.ConfigDict, params: Any = None) -> dict[tuple[str, ...], str]:
    """{parameter subtree: source} of the modules to start from elsewhere, in loading order.

    `config.init_from` (a workdir) comes first, as one entry per top-level module of `params` except the task
    head (all of them when `params` is None: those the source lacks are skipped when loading); then each
    module's own `init_from` (('encoders', m) or ('fusion',)), which overrides it.
    """
    out = {}
    if config.get('init_from'):
        if not os.path.isdir(os.path.join(config.init_from, 'checkpoints')):
            raise ValueError(
                f'config.init_from is {config.init_from!r}, which is not the workdir of a run (no checkpoints/ in '
                'it); a single module starts from a .npz or an orbax checkpoint with its own init_from'
            )
        tops = ('encoders', 'fusion', 'refiner', 'missing') if params is None else tuple(params)
        out.update({(k,): config.init_from for k in tops if k != 'head'})
    for m, entry in config.model.encoders.items():
        if entry.get('init_from'):
            out[('encoders', m)] = entry.init_from
    if config.model.fusion.get('init_from'):
        out[('fusion',)] = config.model.fusion.init_from
    return out


def _field(config: ml_collections.ConfigDict, where: tuple[str, ...]) -> str:
    """The config field that set the source of `where`."""
    own = {('fusion',): config.model.fusion.get('init_from')}
    if where[0] == 'encoders' and len(where) == 2:
        own[where] = config.model.encoders[where[1]].get('init_from')
    return f'config.model.{".".join(where)}.init_from' if own.get(where) else 'config.init_from'


def _flat(tree: Any) -> dict[str, np.ndarray]:
    return {paths.path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _subtree(flat: Mapping[str, np.ndarray], sub: str, source: str, field: str) -> dict[str, np.ndarray]:
    if not sub:
        return dict(flat)
    prefix = sub.strip('/') + '/'
    out = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    if not out:
        tops = sorted({k.split('/')[0] for k in flat})
        raise ValueError(f'{field} is {source!r}: no subtree {sub!r} in it; its top-level names are {tops}')
    return out


def _read_flat(path: str, source: str, field: str) -> dict[str, np.ndarray]:
    """Every array that the file or directory `path` of `source` holds, flat by '/'-joined name."""
    if path.endswith('.npz'):
        return big_vision.read_npz(path, f'{field} is {source!r}')
    if not os.path.isdir(path):
        raise ValueError(
            f'{field} is {source!r}: expected a .npz file, a refnet workdir or an orbax checkpoint'
        )
    if os.path.isdir(os.path.join(path, 'checkpoints')):  # a refnet workdir
        from refnet_jax.train import checkpointing

        ckpt = checkpointing.Checkpointer(epath.Path(path) / 'checkpoints')
        try:
            if ckpt.latest_step() is None:
                raise ValueError(f'{field} is {source!r}, whose workdir holds no checkpoint')
            return _flat(ckpt.restore_params())
        finally:
            ckpt.close()
    import orbax.checkpoint as ocp

    item = next(
        (os.path.join(path, d) for d in ('state', 'default') if os.path.isdir(os.path.join(path, d))), path
    )
    flat = _flat(ocp.PyTreeCheckpointer().restore(os.path.abspath(item)))
    for prefix in ('state/params/', 'params/'):
        if all(k.startswith(prefix) for k in flat):
            flat = {k[len(prefix) :]: v for k, v in flat.items()}
    return flat


def read_source(
    source: str, default_subtree: str, field: str, cache: dict[str, dict[str, np.ndarray]] | None = None
) -> dict[str, np.ndarray]:
    """The flat {name: array} that `source` (see the module docstring) holds for one module: its `:sub/tree`,
    or for a refnet workdir without one, `default_subtree`. `cache` keeps what each path held, so that a run
    started from one workdir reads its checkpoint once."""
    path, _, sub = source.partition(':')
    cache = {} if cache is None else cache
    if path not in cache:
        cache[path] = _read_flat(path, source, field)
    workdir = not path.endswith('.npz') and os.path.isdir(os.path.join(path, 'checkpoints'))
    return _subtree(cache[path], sub or (default_subtree if workdir else ''), source, field)


def resample_posemb(posemb: np.ndarray, tokens: int) -> np.ndarray:
    """(1, N, D) position embeddings of a sqrt(N) x sqrt(N) grid, bilinearly resized to `tokens` positions
    (a square grid), as big_vision's `resample_posemb`."""
    old, new = math.isqrt(posemb.shape[1]), math.isqrt(tokens)
    grid = posemb.reshape(old, old, -1)
    grid = jax.image.resize(grid, (new, new, grid.shape[-1]), method='bilinear')
    return np.asarray(grid).reshape(1, new * new, -1)


def _fit(name: str, source: np.ndarray, want: tuple[int, ...], module: str) -> np.ndarray | None:
    """`source` for a parameter of shape `want`: as it is, resampled (position embeddings), or None (an
    encoder head of another shape: left at its initialization)."""
    if tuple(source.shape) == tuple(want):
        return source
    if name.endswith('pos_embedding') and source.ndim == len(want) == 3 and source.shape[2] == want[2]:
        if math.isqrt(source.shape[1]) ** 2 == source.shape[1] and math.isqrt(want[1]) ** 2 == want[1]:
            logging.info('%s/%s: position embeddings resampled %s -> %s.', module, name, source.shape, want)
            return resample_posemb(source, want[1])
    if name.split('/')[0] == 'head' and module.startswith('encoders/'):
        logging.info(
            '%s/head: %s in the source, %s here; left at its initialization.', module, source.shape, want
        )
        return None
    return False  # a mismatch


def load_into(params: Any, config: ml_collections.ConfigDict) -> Any:
    """`params` with every module that has an `init_from` taken from its source (see the module docstring).

    Raises:
      ValueError: naming the field, and every missing, extra or mismatched parameter with both shapes.
    """
    rename = [(re.compile(a), b) for a, b in config.model.get('init_rename', ())]
    params = _mutable(params)  # a copy of the containers
    cache = {}
    for where, source in module_sources(config, params).items():
        field = _field(config, where)
        module = '/'.join(where)
        if field == 'config.init_from':  # a whole run: the modules the source has
            if module not in {k.split('/')[0] for k in read_source(source, '', field, cache)}:
                continue
        node = params
        for key in where:
            node = node[key]
        want = {paths.path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(node)}
        if source.startswith('hf:'):  # a Hugging Face tower, for the 'pretrained' encoder built from it
            given = _read_tower(config, where, source, field, want)
        else:
            given = read_source(source, module, field, cache)
        for pattern, replacement in rename:
            given = {pattern.sub(replacement, k): v for k, v in given.items()}
        problems, loaded = [], {}
        for name in sorted(set(want) | set(given)):
            if name not in given:
                problems.append(f'  {module}/{name}: source missing, module {tuple(want[name].shape)}')
            elif name not in want:
                problems.append(
                    f'  {module}/{name}: source {tuple(given[name].shape)}, module has no such parameter'
                )
            else:
                fitted = _fit(name, given[name], tuple(want[name].shape), module)
                if fitted is False:
                    problems.append(
                        f'  {module}/{name}: source {tuple(given[name].shape)}, module {tuple(want[name].shape)}'
                    )
                elif fitted is not None:
                    loaded[name] = fitted
        if problems:
            raise ValueError(
                f'{field} is {source!r}, which does not fit {module}:\n'
                + '\n'.join(problems[:20])
                + (f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else '')
            )

        def put(keys, old, loaded=loaded):
            new = loaded.get(paths.path_str(keys))
            if new is None:
                return old
            return jax.device_put(np.asarray(new, old.dtype), old.sharding)

        new_node = jax.tree_util.tree_map_with_path(put, node)
        parent = params
        for key in where[:-1]:
            parent = parent[key]
        parent[where[-1]] = new_node
        logging.info(
            'Initialized %s from %s: %d of its %d parameters.', module, source, len(loaded), len(want)
        )
    return params


def _read_tower(config, where, source, field, want) -> dict[str, np.ndarray]:
    """The parameters of the 'pretrained' encoder `where` from the Hugging Face directory of `source`."""
    from refnet_jax.models.towers import encoder

    entry = config.model.encoders[where[1]] if where[0] == 'encoders' and len(where) == 2 else {}
    if entry.get('module') != 'pretrained':
        raise ValueError(
            f"{field} is {source!r}, a Hugging Face tower, which starts an encoder of module 'pretrained' only"
        )
    try:
        given = encoder.fit_layout(encoder.checkpoint_params(source, entry.get('part')), set(want))
    except ValueError as e:
        raise ValueError(f'{field}: {e}') from None
    # Another image size: a class token's position embedding stays, the grid's is resampled (a tower without
    # a class token, a square grid, is resampled by `_fit` like any position embedding).
    pos, shape = (
        given.get('tower/pos_embedding'),
        tuple(getattr(want.get('tower/pos_embedding'), 'shape', ())),
    )
    if pos is not None and len(shape) == 3 and pos.shape != shape and pos.shape[2] == shape[2]:
        old, new = pos.shape[1] - 1, shape[1] - 1
        if (
            math.isqrt(pos.shape[1]) ** 2 != pos.shape[1]
            and math.isqrt(old) ** 2 == old
            and math.isqrt(new) ** 2 == new
        ):
            logging.info('%s: position embeddings resampled %s -> %s.', field, pos.shape, shape)
            given['tower/pos_embedding'] = np.concatenate(
                [pos[:, :1], resample_posemb(pos[:, 1:], new)], axis=1
            )
    return given


def save_npz(workdir: str, subtree: str, path: str, prefix: str = '') -> int:
    """Writes one module of a refnet workdir's latest checkpoint (`subtree`, e.g. 'encoders/image') as a
    big_vision-layout .npz (flat '/'-joined names under `params/<prefix>/`); returns the array count."""
    from refnet_jax.train import checkpointing

    ckpt = checkpointing.Checkpointer(epath.Path(workdir) / 'checkpoints')
    try:
        flat = _subtree(_flat(ckpt.restore_params()), subtree, workdir, 'subtree')
    finally:
        ckpt.close()
    head = f'params/{prefix.strip("/")}/' if prefix else 'params/'
    np.savez(path, **{head + k: v for k, v in flat.items()})
    return len(flat)


def init_modules(state: Any, config: ml_collections.ConfigDict, tx) -> Any:
    """`state` with every source of `config` loaded (`config.init_from` and the modules' own `init_from`),
    and a fresh optimizer state."""
    if not module_sources(config):
        return state
    params = load_into(state.params, config)
    opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda x: x.sharding, state.opt_state))(params)
    return state.replace(params=params, opt_state=opt_state)


def _mutable(tree: Any) -> Any:
    """Nested plain dicts (a FrozenDict or Mapping tree made mutable)."""
    if isinstance(tree, Mapping):
        return {k: _mutable(v) for k, v in tree.items()}
    return tree


def tower_of(config: ml_collections.ConfigDict, modality: str, params: Any):
    """The 'pretrained' encoder of `modality` with a run's `params` (its whole tree) as a
    `towers.LoadedTower`: the checkpoint it started from (`init_from`, `part`) with the trained parameters.
    With `pooling='tokens'` the encoder had no pooling head; the checkpoint's, untrained, is kept.

    Raises:
      ValueError: `modality` has no encoder of module 'pretrained'.
    """
    import dataclasses

    from refnet_jax.models.towers import loader

    entry = config.model.encoders.get(modality)
    if entry is None or entry.get('module') != 'pretrained':
        raise ValueError(
            f"save_tower: modality {modality!r} has no encoder of module 'pretrained' in the run's config "
            f'(its encoders: {sorted(config.model.encoders)})'
        )
    base = loader.load_tower(entry.init_from, entry.get('part'), scan=entry.get('scan', False))
    trained = _flat(params['encoders'][modality]['tower'])
    merged = {**_flat(base.variables['params']), **trained}
    return dataclasses.replace(base, variables={'params': loader.unflatten(merged)})


def save_tower(tower: Any, path: str, *, modality: str | None = None) -> str:
    """Writes a tower as a Hugging Face directory at `path` (`towers.export.save_tower`): `tower` is a
    `towers.LoadedTower`, or a refnet workdir whose `modality` encoder is a 'pretrained' tower (its latest
    checkpoint's parameters). Returns `path`."""
    from refnet_jax import config_lib
    from refnet_jax.models.towers import export

    if isinstance(tower, str | os.PathLike):
        from refnet_jax.train import checkpointing

        if modality is None:
            raise ValueError(f'save_tower: {str(tower)!r} is a workdir; name the modality of its tower')
        config = config_lib.load_workdir_config(epath.Path(tower))
        ckpt = checkpointing.Checkpointer(epath.Path(tower) / 'checkpoints')
        try:
            if ckpt.latest_step() is None:
                raise ValueError(f'save_tower: the workdir {str(tower)!r} holds no checkpoint')
            tower = tower_of(config, modality, ckpt.restore_params())
        finally:
            ckpt.close()
    return export.save_tower(tower, str(path))
