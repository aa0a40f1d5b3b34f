"""Hateful Memes: a meme's image and its overlaid text -> hateful or not (2 classes, AUROC).

Built offline from a manual download: the data are gated (Meta AI's Hateful Memes Challenge, Kiela et al.
2020, https://arxiv.org/abs/2005.04790), so accept their licence and download them yourself. TFDS reads the files
from its manual directory, which the user sets with `--config.data.manual_dir` (default
`<data_dir>/downloads/manual`). That directory holds the release as published:

  train.jsonl, dev_seen.jsonl, test_seen.jsonl   one JSON object per line, with the fields
                                                 id (int), img ("img/42953.png"), label (0 or 1), text (str)
  dev_unseen.jsonl, test_unseen.jsonl            optional (the second phase of the challenge)
  img/                                           the PNG images, named by the `img` fields

Splits (each keeps its file's line order):
  train              train.jsonl      (8,500 memes in the release)
  validation         dev_seen.jsonl   (500)
  test               test_seen.jsonl  (1,000)
  validation_unseen  dev_unseen.jsonl, when present (540; shares memes with dev_seen)
  test_unseen        test_unseen.jsonl, when present (2,000)
Each example keeps `id`, the meme's id.

Builder configs:
  hateful_memes/raw (default)  `image`: the image decoded with Pillow, converted to RGB (alpha dropped) and
      resized to `IMAGE_SHAPE` with bilinear filtering, aspect ratio not kept (a meme's text can sit anywhere);
      `text`: token ids (`MAX_TOKENS`,) int32. Words are the lower-cased runs of letters and digits (with
      inner apostrophes: "don't"); the vocabulary is `PAD_TOKEN` (id 0), `OOV_TOKEN` (id 1, any other word),
      then the `VOCAB_SIZE - 2` most frequent words of the train split alone (ties in alphabetical order).
      Texts longer than `MAX_TOKENS` words keep their first `MAX_TOKENS`; how many were cut per split is in
      the metadata (`truncated_texts`).
  hateful_memes/features  per-example vectors from a frozen pretrained encoder of the user's choice, instead
      of pixels and words: the manual directory also holds `features.npz` with arrays `id` (N,) int, `image`
      (N, Di) and `text` (N, Dt), one row per meme id of the split files (extra rows are ignored; no image
      is read). `image` and `text` are then 'features' modalities of float32 (Di,) and (Dt,), stored as
      given (no standardization).
The vocabulary, class names, split files and feature widths are stored in the prepared dataset's
`metadata.json`.

`DATASET` implements `refnet_jax.data.contract.DatasetModule` with the per-record defaults: one example per
record, batches `{'image', 'text', 'label'}` (plus `mask` in evaluation), from the builder config that
`config.data.builder_config` picks ('raw' or 'features').
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from refnet_jax.data import common, contract, input_pipeline

IMAGE_SIZE = 64  # images are resized to IMAGE_SIZE x IMAGE_SIZE pixels
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
VOCAB_SIZE = 10_000  # token ids at most, PAD_ID and OOV_ID included
MAX_TOKENS = 48  # words kept per text
CLASS_NAMES = ('not_hateful', 'hateful')  # label 0, label 1
MODALITIES = ('image', 'text')
SPLIT_FILES = {'train': 'train.jsonl', 'validation': 'dev_seen.jsonl', 'test': 'test_seen.jsonl'}
OPTIONAL_SPLIT_FILES = {'validation_unseen': 'dev_unseen.jsonl', 'test_unseen': 'test_unseen.jsonl'}
IMAGE_DIR = 'img'
FEATURES_FILE = 'features.npz'
FIELDS = ('id', 'img', 'label', 'text')
BUILDER_CONFIG_NAMES = ('raw', 'features')
MANUAL_DIR_HELP = (
    'pass the directory of the Hateful Memes release (train.jsonl, dev_seen.jsonl, test_seen.jsonl and the '
    'img/ folder; features.npz for hateful_memes/features) as --config.data.manual_dir'
)

_WORD = re.compile(r"\w+(?:'\w+)*")


class Meme(NamedTuple):
    """One line of a split file, checked."""

    id: int
    img: str
    label: int
    text: str
    line: int  # 1-based line number in its file


# --- Text ---


def split_words(text: str) -> list[str]:
    """The lower-cased words of `text`: runs of letters and digits, with inner apostrophes ("don't")."""
    return _WORD.findall(text.lower())


def build_vocabulary(texts: Iterable[str], max_size: int = VOCAB_SIZE) -> list[str]:
    """Token list (index = id): pad, oov, then the `max_size - 2` most frequent words (ties alphabetical)."""
    return common.build_vocabulary((w for text in texts for w in split_words(text)), max_size)


def tokenize(text: str, word_ids: Mapping[str, int]) -> np.ndarray:
    """Token ids (MAX_TOKENS,) int32 of the first MAX_TOKENS words of `text`, padded with PAD_ID.

    `word_ids` maps a word to its id (the vocabulary inverted); other words get OOV_ID.
    """
    return common.token_ids(split_words(text)[:MAX_TOKENS], word_ids, MAX_TOKENS)


def detokenize(ids: Sequence[int], vocabulary: Sequence[str]) -> str:
    """Words of token `ids`, padding dropped: `tokenize`'s inverse up to case, punctuation and unknown words."""
    return common.detokenize(ids, vocabulary)


# --- Reading and checking the manual files ---


def manual_files(builder_config: str) -> list[str]:
    """The files of the manual directory that `builder_config` needs ('/' ends a directory)."""
    needs = list(SPLIT_FILES.values())
    return [*needs, FEATURES_FILE] if builder_config == 'features' else [*needs, f'{IMAGE_DIR}/']


def read_split_file(path: pathlib.Path) -> list[Meme]:
    """The memes of a .jsonl split file; a bad line raises ValueError naming the file, line, id and field."""
    memes = []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                memes.append(_parse_line(line, path, number))
    if not memes:
        raise ValueError(f'{path} holds no examples; expected one JSON object per line')
    return memes


def _parse_line(line: str, path: pathlib.Path, number: int) -> Meme:
    where = f'{path} line {number}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not JSON ({e.msg} at column {e.colno})') from None
    if not isinstance(record, dict):
        raise ValueError(f'{where}: a JSON {type(record).__name__}, expected an object with fields {FIELDS}')
    if 'id' in record:
        where = f'{where} (id {record["id"]!r})'
    missing = [field for field in FIELDS if field not in record]
    if missing:
        raise ValueError(f'{where}: lacks field {", ".join(missing)}; expected the fields {FIELDS}')
    checks = {
        'id': (lambda v: isinstance(v, int) and not isinstance(v, bool), 'an int'),
        'img': (lambda v: isinstance(v, str) and v != '', f'a path such as "{IMAGE_DIR}/42953.png"'),
        'label': (lambda v: isinstance(v, int) and not isinstance(v, bool) and v in (0, 1), '0 or 1'),
        'text': (lambda v: isinstance(v, str), 'a string'),
    }
    for field, (ok, expected) in checks.items():
        if not ok(record[field]):
            raise ValueError(f'{where}: field {field}={record[field]!r}, expected {expected}')
    return Meme(record['id'], record['img'], record['label'], record['text'], number)


def _meme_image(root: pathlib.Path, split_path: pathlib.Path, meme: Meme) -> np.ndarray:
    where = f'{split_path} line {meme.line} (id {meme.id})'
    path = root / meme.img
    if not path.is_file():
        raise FileNotFoundError(f'{where}: image {path} (field img={meme.img!r}) not found')
    return common.load_image(path, IMAGE_SIZE, where=where)


def load_features(path: pathlib.Path) -> tuple[dict[int, int], dict[str, np.ndarray]]:
    """{id: row} and {'image': (N, Di), 'text': (N, Dt)} float32 from `features.npz`, checked."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as e:
        raise ValueError(f'{path} cannot be read as a NumPy .npz file: {e}') from e
    missing = [name for name in ('id', *MODALITIES) if name not in arrays]
    if missing:
        raise ValueError(
            f'{path} lacks array {", ".join(missing)}; expected id (N,), image (N, Di), text (N, Dt)'
        )
    ids = arrays['id']
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f'{path}: array id has shape {ids.shape} and dtype {ids.dtype}, expected (N,) integers'
        )
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f'{path}: array id repeats id {int(values[counts > 1][0])}; expected one row per id')
    vectors = {}
    for m in MODALITIES:
        x = arrays[m]
        if x.ndim != 2 or x.shape[0] != len(ids) or x.shape[1] == 0 or not np.issubdtype(x.dtype, np.number):
            raise ValueError(
                f'{path}: array {m} has shape {x.shape} and dtype {x.dtype}, expected ({len(ids)}, D) numbers '
                'with D > 0 (a row per id)'
            )
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise ValueError(f'{path}: array {m} has non-finite values in the row of id {int(ids[bad][0])}')
        vectors[m] = x.astype(np.float32)
    return {int(i): row for row, i in enumerate(ids.tolist())}, vectors


# --- The builder ---


class Builder(tfds.core.GeneratorBasedBuilder):
    """Hateful Memes from a manual download, one example per meme; see the module docstring."""

    name = 'hateful_memes'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        '1.0.0': f"{IMAGE_SIZE}x{IMAGE_SIZE} images and train-split word ids, or the user's feature vectors."
    }
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(name='raw', description='Resized RGB images and word ids (the default).'),
        tfds.core.BuilderConfig(
            name='features', description=f'Vectors of a frozen pretrained encoder from {FEATURES_FILE}.'
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        'Download the Hateful Memes release (gated: accept its licence first) and '
        f'{MANUAL_DIR_HELP}. See the docstring of refnet_jax/data/datasets/hateful_memes.py.'
    )

    def _info(self) -> tfds.core.DatasetInfo:
        if self.builder_config.name == 'features':
            # The widths are the user's encoder's, known only from the file: stored in the metadata.
            inputs = {
                m: tfds.features.Tensor(shape=(None,), dtype=np.float32, encoding='bytes') for m in MODALITIES
            }
        else:
            inputs = {
                # Tensor, not Image: Image encodes numpy arrays with TensorFlow.
                'image': tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8, encoding='bytes'),
                'text': tfds.features.Tensor(shape=(MAX_TOKENS,), dtype=np.int32, encoding='bytes'),
            }
        return self.dataset_info_from_configs(
            description=__doc__,
            # Examples stay in file order (TFDS reads this DatasetInfo field, not a class attribute).
            disable_shuffling=True,
            features=tfds.features.FeaturesDict(
                {
                    **inputs,
                    'label': tfds.features.Scalar(dtype=np.int32),
                    'id': tfds.features.Scalar(dtype=np.int64),
                }
            ),
            homepage='https://arxiv.org/abs/2005.04790',
            metadata=tfds.core.MetadataDict(),  # filled in `_split_generators`
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config = self.builder_config.name
        root = common.manual_dir(
            dl_manager, f'Hateful Memes ({config})', manual_files(config), MANUAL_DIR_HELP
        )
        files = {split: root / name for split, name in SPLIT_FILES.items()}
        files.update(
            {split: root / name for split, name in OPTIONAL_SPLIT_FILES.items() if (root / name).is_file()}
        )
        memes = {split: read_split_file(path) for split, path in files.items()}
        self.info.metadata.update(
            {
                'class_names': list(CLASS_NAMES),
                'split_files': {split: path.name for split, path in files.items()},
            }
        )
        if config == 'features':
            rows, vectors = load_features(root / FEATURES_FILE)
            for split, split_memes in memes.items():
                for meme in split_memes:
                    if meme.id not in rows:
                        raise ValueError(
                            f'{root / FEATURES_FILE}: no row for id {meme.id} ({files[split]} line {meme.line}); '
                            'expected a row for every meme of the split files'
                        )
            self.info.metadata['feature_dims'] = {m: int(x.shape[1]) for m, x in vectors.items()}
            return {split: self._generate_feature_examples(memes[split], rows, vectors) for split in memes}

        vocabulary = build_vocabulary(meme.text for meme in memes['train'])
        self.info.metadata.update(
            {
                'vocabulary': vocabulary,
                'truncated_texts': {
                    split: sum(len(split_words(meme.text)) > MAX_TOKENS for meme in split_memes)
                    for split, split_memes in memes.items()
                },
            }
        )
        word_ids = common.word_ids(vocabulary)
        return {split: self._generate_examples(root, files[split], memes[split], word_ids) for split in memes}

    def _generate_examples(
        self, root: pathlib.Path, split_path: pathlib.Path, memes: Sequence[Meme], word_ids: Mapping[str, int]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for meme in memes:
            yield (
                meme.line,
                {
                    'image': _meme_image(root, split_path, meme),
                    'text': tokenize(meme.text, word_ids),
                    'label': meme.label,
                    'id': meme.id,
                },
            )

    def _generate_feature_examples(
        self, memes: Sequence[Meme], rows: Mapping[int, int], vectors: Mapping[str, np.ndarray]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for meme in memes:
            row = rows[meme.id]
            yield meme.line, {**{m: x[row] for m, x in vectors.items()}, 'label': meme.label, 'id': meme.id}


class HatefulMemes(input_pipeline.PerRecordDataset):
    """Hateful Memes for the input pipeline: one example per meme."""

    def make_builder(
        self, data_config: ml_collections.ConfigDict, *, data_dir: str | None, file_format: str
    ) -> tfds.core.DatasetBuilder:
        """The `Builder` of `config.data.builder_config` ('raw' when the field is absent)."""
        name = data_config.get('builder_config', 'raw')
        if name not in BUILDER_CONFIG_NAMES:
            raise ValueError(f'config.data.builder_config={name!r}, expected one of {BUILDER_CONFIG_NAMES}')
        return Builder(config=name, data_dir=data_dir, file_format=file_format)

    def dataset_info(self, builder: tfds.core.DatasetBuilder) -> contract.DatasetInfo:
        metadata = builder.info.metadata
        if builder.builder_config.name == 'features':
            # The features leave the widths unknown; the prepared metadata holds them.
            modalities = {
                m: input_pipeline.modality_info(
                    builder, m, 'features', shape=(int(metadata['feature_dims'][m]),)
                )
                for m in MODALITIES
            }
        else:
            modalities = {
                'image': input_pipeline.modality_info(builder, 'image', 'image'),
                'text': input_pipeline.modality_info(
                    builder, 'text', 'tokens', vocab_size=len(metadata['vocabulary'])
                ),
            }
        return input_pipeline.per_record_info(builder, modalities)


DATASET = HatefulMemes()
