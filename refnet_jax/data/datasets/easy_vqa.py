"""easy-VQA: 64x64 images of one shape and questions about it, 13 answers.

Built offline from the files of the `easy-vqa` PyPI package (MIT). One TFDS example per
IMAGE, holding the image and all its questions as fixed-shape token ids, so that a model
can encode each image once for several of its questions (measured: ~2 instead of ~10
minutes to 0.99 test accuracy on two cores).

Splits (image ids are per package split; no image is in two splits):
  train       the package's training images less `validation`: 3,600 images
  validation  400 training images: the first `NUM_VALIDATION_IMAGES` of a permutation of
              the sorted training image ids by `np.random.default_rng(VALIDATION_SEED)`
  test        the package's test images: 1,000 images, 9,673 questions

Tokens: questions are lowercased, '?' stripped, split on whitespace. The vocabulary is
`PAD_TOKEN` (id 0), `OOV_TOKEN` (id 1, any unknown word), then the sorted words of the
package's training questions (train and validation). It and the answers (label names, in
`easy_vqa.get_answers()` order) are stored in the prepared dataset's `metadata.json`.

`DATASET` implements `refnet_jax.data.contract.DatasetModule`, overriding the per-record defaults: the sampling
of k questions per image, the flattening of batches with an `image_index`, and the label fraction taken of
the questions live here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import easy_vqa as easy_vqa_package
import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from refnet_jax.data import common, contract, input_pipeline

IMAGE_SHAPE = (64, 64, 3)
# Question rows per image: at most 21 questions in the data; 32 lets evaluation batches of
# a power-of-two number of rows hold whole images.
MAX_QUESTIONS = 32
MAX_TOKENS = 12  # Questions have at most 9 words.
ANSWER_PAD = -1  # `answers` entries past `num_questions`.
VALIDATION_SEED = 0
NUM_VALIDATION_IMAGES = 400


def split_words(question: str) -> list[str]:
    """Lowercased words of a question, '?' stripped."""
    return question.lower().replace('?', ' ').split()


def build_vocabulary(questions: Iterable[str]) -> list[str]:
    """Token list (index = id): pad, oov, then the sorted distinct words of `questions`."""
    return common.build_vocabulary(w for q in questions for w in split_words(q))


def tokenize(question: str, vocabulary: Sequence[str]) -> np.ndarray:
    """Token ids (MAX_TOKENS,) int32 of `question`, padded with PAD_ID; unknown: OOV_ID."""
    words = split_words(question)
    if len(words) > MAX_TOKENS:
        raise ValueError(
            f'question {question!r} has {len(words)} words, expected at most MAX_TOKENS={MAX_TOKENS}'
        )
    return common.token_ids(words, common.word_ids(vocabulary), MAX_TOKENS)


def detokenize(ids: Sequence[int], vocabulary: Sequence[str]) -> str:
    """Words of token `ids`, padding dropped: `tokenize`'s inverse up to case and '?'."""
    return common.detokenize(ids, vocabulary)


def validation_image_ids(train_image_ids: Iterable[int]) -> set[int]:
    """The validation images carved from the package's training images (fixed)."""
    ids = np.array(sorted(train_image_ids))
    perm = np.random.default_rng(VALIDATION_SEED).permutation(len(ids))
    return set(ids[perm[:NUM_VALIDATION_IMAGES]].tolist())


def _load_image(path: str) -> np.ndarray:
    array = common.load_image(path)
    if array.shape != IMAGE_SHAPE:
        raise ValueError(f'image {path} has shape {array.shape}, expected {IMAGE_SHAPE}')
    return array


class Builder(tfds.core.GeneratorBasedBuilder):
    """easy-VQA, one example per image; see the module docstring."""

    name = 'easy_vqa'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        '1.0.0': 'One example per image, token ids, validation split carved by image.'
    }
    # Records are stored in TFDS's deterministic key-hash order (the input pipeline shuffles anyway). Storing
    # them in image-id order would need `disable_shuffling=True` passed to `dataset_info_from_configs` (a
    # class attribute of that name is not read) and a new VERSION, since it changes every data order.

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # Tensor, not Image: Image encodes numpy arrays with TensorFlow.
                    'image': tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8, encoding='bytes'),
                    'image_id': tfds.features.Scalar(dtype=np.int32),
                    'num_questions': tfds.features.Scalar(dtype=np.int32),
                    'questions': tfds.features.Tensor(
                        shape=(MAX_QUESTIONS, MAX_TOKENS),
                        dtype=np.int32,
                        encoding='bytes',
                    ),
                    'answers': tfds.features.Tensor(shape=(MAX_QUESTIONS,), dtype=np.int32, encoding='bytes'),
                }
            ),
            homepage='https://pypi.org/project/easy-vqa/',
            # Filled in `_split_generators`, saved as metadata.json next to the data.
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # Everything comes from the installed package.
        train = easy_vqa_package.get_train_questions()
        test = easy_vqa_package.get_test_questions()
        train_paths = easy_vqa_package.get_train_image_paths()
        test_paths = easy_vqa_package.get_test_image_paths()
        answers = easy_vqa_package.get_answers()
        vocabulary = build_vocabulary(train[0])
        val_ids = validation_image_ids(train_paths)

        train_by_image = _group_by_image(*train)
        test_by_image = _group_by_image(*test)
        splits = {
            'train': (
                {i: p for i, p in train_paths.items() if i not in val_ids},
                train_by_image,
            ),
            'validation': (
                {i: p for i, p in train_paths.items() if i in val_ids},
                train_by_image,
            ),
            'test': (test_paths, test_by_image),
        }
        self.info.metadata.update(
            {
                'vocabulary': vocabulary,
                'answers': answers,
                'num_questions': {
                    name: sum(len(by_image[i]) for i in paths) for name, (paths, by_image) in splits.items()
                },
            }
        )
        return {
            name: self._generate_examples(paths, by_image, vocabulary, answers)
            for name, (paths, by_image) in splits.items()
        }

    def _generate_examples(
        self,
        paths: Mapping[int, str],
        by_image: Mapping[int, list[tuple[str, str]]],
        vocabulary: Sequence[str],
        answers: Sequence[str],
    ):
        answer_ids = {a: i for i, a in enumerate(answers)}
        for image_id in sorted(paths):
            qas = by_image[image_id]
            if not 1 <= len(qas) <= MAX_QUESTIONS:
                raise ValueError(
                    f'image {image_id} has {len(qas)} questions, expected 1..MAX_QUESTIONS={MAX_QUESTIONS}'
                )
            questions = np.full((MAX_QUESTIONS, MAX_TOKENS), common.PAD_ID, np.int32)
            labels = np.full((MAX_QUESTIONS,), ANSWER_PAD, np.int32)
            for row, (question, answer) in enumerate(qas):
                questions[row] = tokenize(question, vocabulary)
                labels[row] = answer_ids[answer]
            yield (
                image_id,
                {
                    'image': _load_image(paths[image_id]),
                    'image_id': image_id,
                    'num_questions': len(qas),
                    'questions': questions,
                    'answers': labels,
                },
            )


def _group_by_image(
    questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]
) -> dict[int, list[tuple[str, str]]]:
    by_image: dict[int, list[tuple[str, str]]] = {}
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        by_image.setdefault(image_id, []).append((question, answer))
    return by_image


# --- The input pipeline's transforms and dataset ---


def _questions_per_image(config: ml_collections.ConfigDict) -> int:
    k = config.data.questions_per_image
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_QUESTIONS:
        raise ValueError(f'config.data.questions_per_image={k!r}, expected an int in [1, {MAX_QUESTIONS}]')
    return k


class SampleQuestions(grain.transforms.RandomMap):
    """Keeps `k` questions of an image record, drawn without replacement.

    An image with fewer than `k` questions gives each of them floor(k/n) or ceil(k/n)
    times (a random permutation, cycled), so that none is left out.
    """

    def __init__(self, k: int):
        self.k = k

    def random_map(self, record: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        n = int(record['num_questions'])
        if n >= self.k:
            rows = rng.choice(n, self.k, replace=False)
        else:
            rows = np.resize(rng.permutation(n), self.k)
        return {
            'image': record['image'],
            'question': record['questions'][rows],
            'label': record['answers'][rows],
        }


def flatten_train_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(B_img, k, ...) questions -> (B_img * k, ...) rows, `image_index` into the images."""
    num_images, k = batch['label'].shape
    return {
        'image': batch['image'],  # (B_img, 64, 64, 3)
        'question': batch['question'].reshape(num_images * k, MAX_TOKENS),  # (B, T)
        'image_index': np.repeat(np.arange(num_images, dtype=np.int32), k),  # (B,)
        'label': batch['label'].reshape(num_images * k).astype(np.int32),  # (B,)
    }


class PadEvalBatch(grain.transforms.Map):
    """Batched image records -> `num_images * MAX_QUESTIONS` rows, padded and masked."""

    def __init__(self, num_images: int):
        self.num_images = num_images

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        real = batch['image'].shape[0]
        pad = self.num_images - real
        images = np.concatenate([batch['image'], np.zeros((pad, *IMAGE_SHAPE), np.uint8)])
        questions = np.concatenate([batch['questions'], np.zeros((pad, MAX_QUESTIONS, MAX_TOKENS), np.int32)])
        counts = np.concatenate([batch['num_questions'], np.zeros((pad,), np.int32)])
        mask = np.arange(MAX_QUESTIONS)[None, :] < counts[:, None]  # (B_img, Q)
        labels = np.where(
            mask,
            np.concatenate([batch['answers'], np.zeros((pad, MAX_QUESTIONS), np.int32)]),
            0,
        )
        rows = self.num_images * MAX_QUESTIONS
        return {
            'image': images,
            'question': questions.reshape(rows, MAX_TOKENS),
            'image_index': np.repeat(np.arange(self.num_images, dtype=np.int32), MAX_QUESTIONS),
            'label': labels.reshape(rows).astype(np.int32),
            'mask': mask.reshape(rows),
        }


class EasyVQA(input_pipeline.PerRecordDataset):
    """easy-VQA for the input pipeline: records are images, examples their questions (k sampled per image in
    training, all of them in evaluation), batches flat rows of questions with an `image_index`."""

    Builder = Builder

    def dataset_info(self, builder: tfds.core.DatasetBuilder) -> contract.DatasetInfo:
        metadata = builder.info.metadata
        return contract.DatasetInfo(
            name=builder.name,
            modalities={
                'image': input_pipeline.modality_info(builder, 'image', 'image', shared=True),
                'question': input_pipeline.modality_info(
                    builder, 'questions', 'tokens', stacked=True, vocab_size=len(metadata['vocabulary'])
                ),
            },
            num_classes=len(metadata['answers']),
            multi_label=False,
            class_names=tuple(metadata['answers']),
            num_examples={split: int(n) for split, n in metadata['num_questions'].items()},
        )

    def labeled_subset(self, source, fraction: float, seed: int) -> input_pipeline.SubsetSource:
        """The image records holding a stratified `fraction` of the training questions, with only those
        questions.

        The questions (not the images) are the labeled examples: `input_pipeline.stratified_subset` picks them
        by answer; each image keeps its picked questions (moved to the front, `num_questions` updated), and an
        image with none is left out.
        """
        counts = np.array([int(source[i]['num_questions']) for i in range(len(source))])
        answers = np.concatenate([source[i]['answers'][:n] for i, n in enumerate(counts)])
        owner = np.repeat(np.arange(len(source)), counts)  # question -> its image record
        slot = np.concatenate([np.arange(n) for n in counts])
        picked = input_pipeline.stratified_subset(answers, fraction, seed)
        images = np.unique(owner[picked])
        slots = {int(i): slot[picked][owner[picked] == i] for i in images}

        def keep_picked(position: int, record: dict[str, Any]) -> dict[str, Any]:
            rows = slots[int(images[position])]
            n = len(rows)
            questions = np.zeros_like(record['questions'])
            answers = np.zeros_like(record['answers'])
            questions[:n], answers[:n] = record['questions'][rows], record['answers'][rows]
            return {**record, 'questions': questions, 'answers': answers, 'num_questions': np.int32(n)}

        return input_pipeline.SubsetSource(source, images, keep_picked)

    def train_examples(
        self, records: grain.MapDataset, config: ml_collections.ConfigDict, *, info: contract.DatasetInfo
    ) -> grain.MapDataset:
        """Image records -> one element per image with k of its questions, drawn at random."""
        del info
        return records.random_map(SampleQuestions(_questions_per_image(config)))

    def train_batches(
        self,
        examples: grain.MapDataset,
        config: ml_collections.ConfigDict,
        *,
        info: contract.DatasetInfo,
        batch_size: int,
    ) -> grain.MapDataset:
        """Batches of `batch_size` questions: `batch_size // k` images, k questions each."""
        del info
        k = _questions_per_image(config)
        if batch_size % k:
            raise ValueError(
                f'config.train.batch_size={config.train.batch_size} ({batch_size} per '
                f'process) and config.data.questions_per_image={k}: expected the batch '
                'size per process to be a multiple of questions_per_image'
            )
        return examples.batch(batch_size // k).map(flatten_train_batch)

    def eval_dataset(
        self,
        records: grain.MapDataset,
        config: ml_collections.ConfigDict,
        *,
        info: contract.DatasetInfo,
        batch_size: int,
    ) -> grain.MapDataset:
        """Every question once, in batches of `batch_size // MAX_QUESTIONS` whole images.

        Each image brings MAX_QUESTIONS rows; rows past its questions, and the images that
        fill up the last batch, have `mask` False and label 0.
        """
        del config, info
        if batch_size % MAX_QUESTIONS:
            raise ValueError(
                f"config.eval.batch_size (or eval_batches' batch_size) gives {batch_size} "
                f'rows per process, expected a multiple of MAX_QUESTIONS={MAX_QUESTIONS} '
                '(each image brings its questions padded to MAX_QUESTIONS rows)'
            )
        num_images = batch_size // MAX_QUESTIONS
        return records.batch(num_images, drop_remainder=False).map(PadEvalBatch(num_images))


DATASET = EasyVQA()
