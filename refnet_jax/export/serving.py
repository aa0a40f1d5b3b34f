"""Export a trained ReFNet for serving with `jax.export`, and load it back with JAX and NumPy alone.

An export directory holds three files:
  `inference.jaxexport`  the serialized `jax.export.Exported` of `f(params, batch) -> logits`: encoders, fusion
                         and head, no refiner, no dropout (`model.apply(..., train=False, with_refiner=False)`).
  `params.npz`           the parameters that function uses, one array per '/'-joined parameter path
                         (`image/Conv_0/kernel`); plain `.npy` members, read with `allow_pickle=False`.
  `signature.json`       the inputs (name, shape with symbolic dimensions, dtype), the output and the class names.

The batch dimensions are symbolic, so one export serves any batch size: `b` is the number of examples, and a
modality `m` stored once for several examples (`ModalityInfo.shared`, easy-VQA's `image`) has its own row count
`rows_<m>`, with `<m>_index` (b,) int32 giving each example's row, as in training batches. Each modality also
has an optional `<m>_present` (b,) bool input, False where m is missing (its values are then not read); `load`
fills in True where it is not given.

Parameters are kept out of the exported function rather than baked into it as constants: the serialized
module stays small and independent of the weights (a new checkpoint of the same config re-uses it), and the
weights stay readable with plain NumPy.

`load(directory)` needs only `jax` and `numpy`: this module imports flax, the model code and orbax lazily, inside
the functions that export, so that a serving process importing it for `load` pulls in none of them.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EXPORTED_FILE = 'inference.jaxexport'
PARAMS_FILE = 'params.npz'
SIGNATURE_FILE = 'signature.json'
BATCH_DIM = 'b'


def rows_dim(modality: str) -> str:
    """The symbolic row count of a shared modality."""
    return f'rows_{modality}'


def input_signature(info) -> dict[str, tuple[tuple[str | int, ...], str]]:
    """{input name: (shape, dtype name)} of the inference batch of a dataset (an `contract.DatasetInfo`).

    Dimensions are ints, or the names of symbolic dimensions: `b` (examples) and `rows_<m>` (rows of a shared
    modality m).
    """
    inputs = {}
    for m in sorted(info.modalities):
        mi = info.modalities[m]
        rows = rows_dim(m) if mi.shared else BATCH_DIM
        inputs[m] = ((rows, *mi.shape), np.dtype(mi.dtype).name)
        if mi.shared:
            inputs[f'{m}_index'] = ((BATCH_DIM,), 'int32')
    for m in sorted(info.modalities):
        inputs[present_name(m)] = ((BATCH_DIM,), 'bool')
    return inputs


def present_name(modality: str) -> str:
    """The optional presence input of a modality (`contract.present_key`; this module imports no contract)."""
    return f'{modality}_present'


def _num_examples(batch: Mapping[str, Any], inputs: Mapping[str, Any]) -> int:
    """b: the leading size of a given input whose first dimension is `b`."""
    for name, spec in inputs.items():
        if name in batch and spec['shape'] and spec['shape'][0] == BATCH_DIM:
            return int(np.shape(batch[name])[0])
    raise ValueError(f'batch has none of the inputs {sorted(inputs)}')


def _flatten(params: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    """Nested parameter dicts -> {'a/b/c': leaf}."""
    flat = {}
    for k, v in params.items():
        if '/' in k:
            raise ValueError(
                f'parameter name {prefix}{k!r} contains "/", which the flat paths use as separator'
            )
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f'{prefix}{k}/'))
        else:
            flat[f'{prefix}{k}'] = v
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dicts."""
    nested: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split('/')
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return nested


def inference_params(model, params: Mapping[str, Any], info) -> dict[str, Any]:
    """The subset of `params` (a checkpoint's, refiner included) that inference uses, shape-checked.

    Raises:
      checkpointing.ShapeMismatchError: naming each parameter whose shape differs from the config's model, or
        that the checkpoint lacks.
    """
    from refnet_jax.data import contract
    from refnet_jax.train import checkpointing

    example = contract.dummy_batch(info, 2)
    abstract = jax.eval_shape(
        lambda batch: model.init(jax.random.key(0), batch, train=False, with_refiner=False)['params'], example
    )
    wanted = _flatten(abstract)
    given = _flatten(params)
    subset = {path: np.asarray(given[path]) for path in wanted if path in given}
    checkpointing.check_shapes(_unflatten(subset), abstract, 'the checkpoint')
    return subset


def export_model(
    model,
    params: Mapping[str, Any],
    info,
    output_dir: str | pathlib.Path,
    *,
    platforms: Sequence[str] | None = None,
) -> jax.export.Exported:
    """Exports `model`'s inference with the checkpoint parameters `params` into `output_dir`.

    Args:
      model: the `ReFNet` of the run's config (`model.create_model`).
      params: the trained parameters (nested dicts of arrays, refiner parameters may be included: they are
        dropped, inference does not use them).
      info: the dataset's `contract.DatasetInfo`.
      output_dir: created if needed; its export files are overwritten.
      platforms: the platforms to lower for, e.g. ('cpu', 'cuda'); None: the default backend of this process.

    Returns:
      The `jax.export.Exported` that was serialized.
    """
    flat = inference_params(model, params, info)
    signature = input_signature(info)
    dim_names = sorted({d for shape, _ in signature.values() for d in shape if isinstance(d, str)})
    dims = dict(zip(dim_names, jax.export.symbolic_shape(', '.join(dim_names)), strict=True))
    batch_spec = {
        name: jax.ShapeDtypeStruct(tuple(dims.get(d, d) for d in shape), dtype)
        for name, (shape, dtype) in signature.items()
    }
    params_spec = {path: jax.ShapeDtypeStruct(x.shape, x.dtype) for path, x in flat.items()}

    def infer(flat_params, batch):
        logits, _ = model.apply({'params': _unflatten(flat_params)}, batch, train=False, with_refiner=False)
        return logits

    exported = jax.export.export(jax.jit(infer), platforms=platforms)(params_spec, batch_spec)

    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPORTED_FILE).write_bytes(exported.serialize())
    np.savez(out / PARAMS_FILE, **flat)
    (out / SIGNATURE_FILE).write_text(
        json.dumps(
            {
                'inputs': {
                    name: {'shape': list(shape), 'dtype': dtype} for name, (shape, dtype) in signature.items()
                },
                'output': {'name': 'logits', 'shape': [BATCH_DIM, info.num_classes], 'dtype': 'float32'},
                'multi_label': info.multi_label,
                'class_names': list(info.class_names),
                'platforms': list(exported.platforms),
            },
            indent=2,
        )
    )
    return exported


def export_workdir(
    workdir: str | pathlib.Path,
    output_dir: str | pathlib.Path,
    *,
    step: int | None = None,
    platforms: Sequence[str] | None = None,
) -> jax.export.Exported:
    """Exports the run in `workdir` (`inference.load_run`): its `config.json`, and the parameters of its
    latest checkpoint (or `step`)."""
    from refnet_jax.train import inference

    loaded = inference.load_run(workdir, step=step)
    return export_model(loaded.model, loaded.params, loaded.info, output_dir, platforms=platforms)


def load(directory: str | pathlib.Path) -> Callable[[Mapping[str, Any]], jax.Array]:
    """Loads an export directory: returns `predict(batch) -> logits` (b, num_classes).

    Needs only jax and numpy. `batch` maps the input names of `signature.json` to arrays (other keys, such as
    `label` or `mask`, are ignored); integer inputs of another width are converted; another kind of dtype, a
    fixed dimension that differs or an index out of range is an error. A `<m>_present` input not given is all
    True (m in every example). Each new batch shape compiles once.
    """
    directory = pathlib.Path(directory)
    exported = jax.export.deserialize(bytearray((directory / EXPORTED_FILE).read_bytes()))
    with np.load(directory / PARAMS_FILE, allow_pickle=False) as data:
        params = {name: jnp.asarray(data[name]) for name in data.files}
    inputs = json.loads((directory / SIGNATURE_FILE).read_text())['inputs']
    call = jax.jit(exported.call)

    def predict(batch: Mapping[str, Any]) -> jax.Array:
        args = {}
        defaults = {}
        for name, spec in inputs.items():
            if name.endswith('_present') and spec['dtype'] == 'bool' and name not in batch:
                defaults[name] = np.ones((_num_examples(batch, inputs),), bool)
        batch = {**batch, **defaults}
        for name, spec in inputs.items():
            if name not in batch:
                raise ValueError(f'batch lacks input {name!r}; the model takes {sorted(inputs)}')
            x, want, shape = np.asarray(batch[name]), np.dtype(spec['dtype']), spec['shape']
            fits = len(x.shape) == len(shape) and all(
                isinstance(d, str) or d == n for d, n in zip(shape, x.shape, strict=False)
            )
            if x.dtype.kind != want.kind or not fits:
                raise ValueError(
                    f'batch[{name!r}] has dtype {x.dtype} and shape {x.shape}; expected {want} of shape '
                    f'{tuple(shape)}'
                )
            args[name] = x.astype(want, copy=False)
        for name, index in args.items():
            rows = args.get(name.removesuffix('_index')) if name.endswith('_index') else None
            if rows is not None and index.size and (index.min() < 0 or index.max() >= rows.shape[0]):
                raise ValueError(
                    f'batch[{name!r}] holds rows [{index.min()}, {index.max()}] of '
                    f'batch[{name.removesuffix("_index")!r}], which has {rows.shape[0]}'
                )
        return call(params, args)

    return predict
