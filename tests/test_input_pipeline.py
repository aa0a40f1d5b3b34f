"""Tests of the easy-VQA builder and the input pipeline, on the real data.

The data is prepared once per session into a temporary directory (about 2 s).
"""

import collections
import importlib
import os
import pkgutil
import sys
import time
import types

import easy_vqa as easy_vqa_package
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from refnet_jax.data import common, contract, datasets, input_pipeline
from refnet_jax.data.datasets import easy_vqa

NUM_TRAIN_QUESTIONS = 38_575  # train + validation
NUM_TEST_QUESTIONS = 9_673


def make_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {
            'data': {
                'name': 'easy_vqa',
                'data_dir': str(data_dir),
                'questions_per_image': 8,
            },
            'train': {'batch_size': 64},
            'eval': {'batch_size': 256},
        }
    )
    for key, value in overrides.items():
        section, field = key.split('.')
        config[section][field] = value
    return config


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('tfds')
    input_pipeline.get_dataset_info(make_config(path).data)
    return path


@pytest.fixture(scope='session')
def truth():
    """The package's own data per split: (pixels -> image id, id -> [(words, answer id)])."""
    answers = easy_vqa_package.get_answers()
    out = {}
    for split, questions, paths in [
        (
            'train',
            easy_vqa_package.get_train_questions(),
            easy_vqa_package.get_train_image_paths(),
        ),
        (
            'test',
            easy_vqa_package.get_test_questions(),
            easy_vqa_package.get_test_image_paths(),
        ),
    ]:
        ids_by_pixels = {}
        for image_id, path in paths.items():
            with Image.open(path) as image:
                ids_by_pixels[np.asarray(image.convert('RGB')).tobytes()] = image_id
        assert len(ids_by_pixels) == len(paths), 'image pixels do not identify images'
        by_image = collections.defaultdict(list)
        for question, answer, image_id in zip(*questions, strict=True):
            by_image[image_id].append((' '.join(easy_vqa.split_words(question)), answers.index(answer)))
        out[split] = (ids_by_pixels, dict(by_image))
    val_ids = easy_vqa.validation_image_ids(out['train'][1])
    ids_by_pixels, by_image = out['train']
    out['validation'] = (
        ids_by_pixels,
        {i: qs for i, qs in by_image.items() if i in val_ids},
    )
    out['train'] = (
        ids_by_pixels,
        {i: qs for i, qs in by_image.items() if i not in val_ids},
    )
    return out


@pytest.fixture(scope='session')
def vocabulary(data_dir):
    _, builder = input_pipeline._prepared_builder(make_config(data_dir).data)
    return builder.info.metadata['vocabulary']


def rows(batch, vocabulary, ids_by_pixels):
    """(image id, question words, label) of each (unmasked) row, found through `image_index`."""
    mask = batch.get('mask', np.ones(batch['label'].shape, bool))
    out = []
    for r in np.flatnonzero(mask):
        image = batch['image'][batch['image_index'][r]]
        out.append(
            (
                ids_by_pixels[image.tobytes()],
                easy_vqa.detokenize(batch['question'][r], vocabulary),
                int(batch['label'][r]),
            )
        )
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# --- Builder ---


def test_dataset_info(data_dir):
    info = input_pipeline.get_dataset_info(make_config(data_dir).data)
    assert info.name == 'easy_vqa'
    assert info.num_classes == 13 and not info.multi_label
    assert info.class_names == tuple(easy_vqa_package.get_answers())
    assert info.num_examples['train'] + info.num_examples['validation'] == NUM_TRAIN_QUESTIONS
    assert info.num_examples['test'] == NUM_TEST_QUESTIONS
    assert info.modalities['image'] == contract.ModalityInfo(
        kind='image', shape=(64, 64, 3), dtype=np.uint8, shared=True
    )
    question = info.modalities['question']
    assert (question.kind, question.shape, question.shared) == (
        'tokens',
        (easy_vqa.MAX_TOKENS,),
        False,
    )
    assert question.vocab_size == 2 + 26  # pad, oov and the 26 words of the training questions


def test_splits_disjoint_by_image_and_complete(data_dir, truth):
    _, builder = input_pipeline._prepared_builder(make_config(data_dir).data)
    image_ids = {}
    for split in ('train', 'validation', 'test'):
        source = builder.as_data_source(split=split)
        image_ids[split] = [int(source[i]['image_id']) for i in range(len(source))]
        assert len(set(image_ids[split])) == len(image_ids[split])
        assert set(image_ids[split]) == set(truth[split][1]), split
        num_questions = sum(int(source[i]['num_questions']) for i in range(len(source)))
        assert num_questions == builder.info.metadata['num_questions'][split]
    assert not set(image_ids['train']) & set(image_ids['validation'])
    assert len(image_ids['validation']) == easy_vqa.NUM_VALIDATION_IMAGES
    assert len(image_ids['train']) + len(image_ids['validation']) == 4000
    assert len(image_ids['test']) == 1000


def test_validation_split_is_fixed():
    ids = easy_vqa.validation_image_ids(range(4000))
    assert ids == easy_vqa.validation_image_ids(reversed(range(4000)))
    assert len(ids) == 400 and sorted(ids)[:5] == [
        4,
        12,
        21,
        28,
        30,
    ]  # Golden: changing it is a new version.


def test_vocabulary_and_tokenization_round_trip(vocabulary):
    questions = easy_vqa_package.get_train_questions()[0] + easy_vqa_package.get_test_questions()[0]
    assert vocabulary == easy_vqa.build_vocabulary(easy_vqa_package.get_train_questions()[0])
    assert vocabulary[:2] == [common.PAD_TOKEN, common.OOV_TOKEN]
    assert vocabulary[2:] == sorted(vocabulary[2:])
    for question in questions:
        ids = easy_vqa.tokenize(question, vocabulary)
        assert ids.shape == (easy_vqa.MAX_TOKENS,) and ids.dtype == np.int32
        assert common.OOV_ID not in ids
        assert easy_vqa.detokenize(ids, vocabulary) == question.lower().rstrip('?')
    ids = easy_vqa.tokenize('Is there a PURPLE shape?', vocabulary)
    assert ids[3] == common.OOV_ID and ids[5] == common.PAD_ID
    with pytest.raises(ValueError, match='MAX_TOKENS'):
        easy_vqa.tokenize('a ' * (easy_vqa.MAX_TOKENS + 1), vocabulary)


def test_prepare_twice_reuses_the_prepared_copy(data_dir):
    files = sorted((data_dir / 'easy_vqa' / '1.0.0').iterdir())
    before = {f: os.stat(f).st_mtime_ns for f in files}
    start = time.perf_counter()
    info = input_pipeline.get_dataset_info(make_config(data_dir).data)
    assert time.perf_counter() - start < 0.5
    assert {f: os.stat(f).st_mtime_ns for f in sorted((data_dir / 'easy_vqa' / '1.0.0').iterdir())} == before
    assert info.num_examples['test'] == NUM_TEST_QUESTIONS


def test_interrupted_preparation_is_never_used(tmp_path, monkeypatch):
    data_config = make_config(tmp_path).data
    # Left over by a killed preparation: never read, never in the way.
    leftover = tmp_path / 'easy_vqa' / 'incomplete.ABCDEF_1.0.0'
    leftover.mkdir(parents=True)
    (leftover / 'easy_vqa-train.array_record-00000-of-00001').write_bytes(b'junk')

    generate = easy_vqa.Builder._generate_examples

    def fail_midway(self, *args):
        for i, example in enumerate(generate(self, *args)):
            if i == 10:
                raise RuntimeError('interrupted')
            yield example

    monkeypatch.setattr(easy_vqa.Builder, '_generate_examples', fail_midway)
    with pytest.raises(RuntimeError, match='interrupted'):
        input_pipeline.get_dataset_info(data_config)
    assert not (tmp_path / 'easy_vqa' / '1.0.0').exists()

    monkeypatch.setattr(easy_vqa.Builder, '_generate_examples', generate)
    info = input_pipeline.get_dataset_info(data_config)
    assert info.num_examples['test'] == NUM_TEST_QUESTIONS


def test_concurrent_preparation_uses_the_copy_that_won(tmp_path, monkeypatch):
    """Two processes prepare into one data_dir: the one whose rename fails reads the other's."""
    data_config = make_config(tmp_path).data
    prepare = easy_vqa.Builder._download_and_prepare
    raced = []

    def other_process_finishes_first(self, *args, **kwargs):
        if not raced:
            raced.append(True)
            input_pipeline.get_dataset_info(data_config)  # Wins the race while we are still writing.
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(easy_vqa.Builder, '_download_and_prepare', other_process_finishes_first)
    info = input_pipeline.get_dataset_info(data_config)
    assert raced and info.num_examples['test'] == NUM_TEST_QUESTIONS
    assert [p.name for p in (tmp_path / 'easy_vqa').iterdir()] == ['1.0.0']  # Our incomplete copy is gone.


def test_incomplete_dataset_directory_is_an_error(tmp_path):
    (tmp_path / 'easy_vqa' / '1.0.0').mkdir(parents=True)
    with pytest.raises(RuntimeError, match='no complete TFDS dataset'):
        input_pipeline.get_dataset_info(make_config(tmp_path).data)


# --- Train iterator ---


def test_train_batch_shapes_and_image_index(data_dir, truth, vocabulary):
    config = make_config(data_dir, **{'train.batch_size': 256, 'data.questions_per_image': 8})
    iterator = input_pipeline.make_train_iterator(config, seed=0)
    ids_by_pixels, by_image = truth['train']
    for _ in range(3):
        batch = next(iterator)
        assert set(batch) == {'image', 'question', 'image_index', 'label'}
        assert batch['image'].shape == (32, 64, 64, 3) and batch['image'].dtype == np.uint8
        assert batch['question'].shape == (256, easy_vqa.MAX_TOKENS) and batch['question'].dtype == np.int32
        assert batch['image_index'].dtype == np.int32 and batch['label'].dtype == np.int32
        np.testing.assert_array_equal(batch['image_index'], np.repeat(np.arange(32), 8))
        for image_id, question, label in rows(batch, vocabulary, ids_by_pixels):
            assert (question, label) in by_image[image_id]
        # k questions of one image are distinct rows when it has at least k of them.
        for i in range(32):
            image_id = ids_by_pixels[batch['image'][i].tobytes()]
            if len(set(by_image[image_id])) == len(by_image[image_id]) >= 8:
                assert len({batch['question'][r].tobytes() for r in range(8 * i, 8 * i + 8)}) == 8


def test_few_questions_are_cycled():
    record = {
        'image': np.zeros((64, 64, 3), np.uint8),
        'num_questions': 3,
        'questions': np.arange(32 * 12, dtype=np.int32).reshape(32, 12),
        'answers': np.arange(32, dtype=np.int32),
    }
    sampled = easy_vqa.SampleQuestions(8).random_map(record, np.random.default_rng(0))
    assert sorted(collections.Counter(sampled['label'].tolist()).values()) == [2, 3, 3]
    np.testing.assert_array_equal(sampled['question'], record['questions'][sampled['label']])


def test_train_iterator_is_deterministic_given_seed(data_dir):
    config = make_config(data_dir)
    first = [next(it) for it in [input_pipeline.make_train_iterator(config, seed=3)] for _ in range(3)]
    again = [next(it) for it in [input_pipeline.make_train_iterator(config, seed=3)] for _ in range(3)]
    other = next(input_pipeline.make_train_iterator(config, seed=4))
    assert_same_batches(first, again)
    assert not np.array_equal(first[0]['image'], other['image'])


def test_train_iterator_state_resumes_identically(data_dir):
    config = make_config(data_dir)  # 8 images per batch: 450 batches per epoch.
    iterator = input_pipeline.make_train_iterator(config, seed=0)
    for _ in range(448):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(4)]  # Crosses into the second epoch.
    resumed = input_pipeline.make_train_iterator(config, seed=0)
    resumed.set_state(state)
    assert_same_batches([next(resumed) for _ in range(4)], expected)


def test_train_iterator_checkpoints_with_orbax(data_dir, tmp_path):
    config = make_config(data_dir)
    iterator = input_pipeline.make_train_iterator(config, seed=0)
    for _ in range(5):
        next(iterator)
    with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = [next(iterator) for _ in range(3)]
    resumed = input_pipeline.make_train_iterator(config, seed=0)
    with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
        manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert_same_batches([next(resumed) for _ in range(3)], expected)


def test_train_epoch_covers_each_image_once_and_process_shards_are_disjoint(data_dir, truth):
    config = make_config(data_dir, **{'train.batch_size': 256})  # 16 images per process and batch.
    ids_by_pixels, by_image = truth['train']
    shards = []
    for process_index in range(2):
        iterator = input_pipeline.make_train_iterator(
            config, seed=0, process_index=process_index, process_count=2
        )
        epoch = []
        while len(epoch) < len(by_image) // 2:
            batch = next(iterator)
            assert batch['image'].shape[0] == 16 and batch['label'].shape == (128,)
            epoch.extend(ids_by_pixels[image.tobytes()] for image in batch['image'])
        epoch = epoch[: len(by_image) // 2]
        assert len(set(epoch)) == len(epoch)
        shards.append(set(epoch))
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(by_image)


def test_the_processes_batches_together_are_the_single_process_batch(data_dir):
    """Batch k of every process together holds the questions (random draws included) of batch k on one."""

    def rows(batches):
        out = []
        for batch in batches:
            images = [image.tobytes() for image in batch['image']]
            out += [
                (images[i], q.tobytes(), int(y))
                for i, q, y in zip(batch['image_index'], batch['question'], batch['label'], strict=True)
            ]
        return sorted(out)

    config = make_config(data_dir, **{'train.batch_size': 128})
    single = input_pipeline.make_train_iterator(config, seed=3)
    shards = [
        input_pipeline.make_train_iterator(config, seed=3, process_index=i, process_count=2) for i in range(2)
    ]
    for _ in range(3):
        assert rows([next(single)]) == rows([next(shard) for shard in shards])


def test_process_defaults_come_from_jax(data_dir, monkeypatch):
    config = make_config(data_dir, **{'train.batch_size': 128})
    explicit = next(input_pipeline.make_train_iterator(config, seed=0, process_index=1, process_count=2))
    monkeypatch.setattr(jax, 'process_index', lambda: 1)
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    default = next(input_pipeline.make_train_iterator(config, seed=0))
    assert_same_batches([default], [explicit])


@pytest.mark.parametrize(
    ('overrides', 'match'),
    [
        (
            {'data.questions_per_image': 3},
            r'config\.train\.batch_size=64 .*config\.data\.questions_per_image=3',
        ),
        ({'data.questions_per_image': 0}, r'config\.data\.questions_per_image=0'),
        (
            {'data.questions_per_image': 64},
            r'config\.data\.questions_per_image=64.*\[1, 32\]',
        ),
        ({'train.batch_size': 0}, r'config\.train\.batch_size=0'),
        ({'data.name': 'no_such_dataset'}, r"config\.data\.name='no_such_dataset'"),
    ],
)
def test_train_config_errors(data_dir, overrides, match):
    with pytest.raises(ValueError, match=match):
        input_pipeline.make_train_iterator(make_config(data_dir, **overrides), seed=0)


def test_batch_size_must_split_over_processes(data_dir):
    with pytest.raises(ValueError, match=r'config\.train\.batch_size=64.*process count 3'):
        input_pipeline.make_train_iterator(make_config(data_dir), seed=0, process_index=0, process_count=3)


# --- Evaluation ---


@pytest.mark.parametrize('split', ['validation', 'test'])
def test_eval_batches_cover_every_question_once(data_dir, truth, vocabulary, split):
    config = make_config(data_dir, **{'eval.batch_size': 7 * easy_vqa.MAX_QUESTIONS})  # 7 images per batch
    info = input_pipeline.get_dataset_info(config.data)
    ids_by_pixels, by_image = truth[split]
    seen = []
    batches = list(input_pipeline.eval_batches(config, split))
    assert len(batches) == -(-len(by_image) // 7)
    for batch in batches:
        assert batch['image'].shape == (7, 64, 64, 3)
        assert batch['question'].shape == (
            7 * easy_vqa.MAX_QUESTIONS,
            easy_vqa.MAX_TOKENS,
        )
        assert batch['mask'].shape == (7 * easy_vqa.MAX_QUESTIONS,) and batch['mask'].dtype == bool
        assert batch['label'].min() >= 0
        seen.extend(rows(batch, vocabulary, ids_by_pixels))
    assert sum(int(b['mask'].sum()) for b in batches) == info.num_examples[split] == len(seen)
    expected = [(i, q, a) for i, qas in by_image.items() for q, a in qas]
    assert collections.Counter(seen) == collections.Counter(expected)
    # The last batch is filled up with masked images.
    per_image = batches[-1]['mask'].reshape(7, easy_vqa.MAX_QUESTIONS).any(axis=1)
    assert per_image.sum() == len(by_image) % 7 and not per_image[len(by_image) % 7 :].any()


def test_eval_batches_shard_over_processes(data_dir, truth, vocabulary):
    config = make_config(data_dir)
    ids_by_pixels, by_image = truth['validation']
    seen, num_batches = [], []
    for process_index in range(2):
        batches = list(
            input_pipeline.eval_batches(
                config,
                'validation',
                batch_size=640,
                process_index=process_index,
                process_count=2,
            )
        )
        num_batches.append(len(batches))
        assert all(b['question'].shape == (320, easy_vqa.MAX_TOKENS) for b in batches)
        seen.extend(rows(b, vocabulary, ids_by_pixels) for b in batches)
    assert num_batches == [20, 20]  # 200 images per process, 10 per batch
    flat = [row for batch_rows in seen for row in batch_rows]
    assert collections.Counter(flat) == collections.Counter(
        (i, q, a) for i, qas in by_image.items() for q, a in qas
    )


def test_eval_pads_processes_to_the_same_number_of_batches(data_dir):
    # 400 images over 3 processes: 134, 133, 133; one image per batch, so the last two
    # processes end with one blank batch each.
    config = make_config(data_dir)
    counts = []
    for process_index in range(3):
        batches = list(
            input_pipeline.eval_batches(
                config,
                'validation',
                batch_size=96,
                process_index=process_index,
                process_count=3,
            )
        )
        counts.append((len(batches), sum(int(b['mask'].any()) for b in batches)))
    assert counts == [(134, 134), (134, 133), (134, 133)]


@pytest.mark.parametrize(
    ('batch_size', 'split', 'match'),
    [
        (100, 'test', r'eval\.batch_size.*gives 100 rows.*MAX_QUESTIONS=32'),
        (-32, 'test', r'batch_size=-32'),
        (256, 'dev', r"split='dev'"),
    ],
)
def test_eval_errors(data_dir, batch_size, split, match):
    with pytest.raises(ValueError, match=match):
        list(input_pipeline.eval_batches(make_config(data_dir), split, batch_size))


def test_modality_info_validates():
    with pytest.raises(ValueError, match='kind'):
        contract.ModalityInfo(kind='video', shape=(1,), dtype=np.float32)
    with pytest.raises(ValueError, match='vocab_size'):
        contract.ModalityInfo(kind='tokens', shape=(12,), dtype=np.int32)


DATASET_MODULES = sorted(m.name for m in pkgutil.iter_modules(datasets.__path__))


@pytest.mark.parametrize('name', DATASET_MODULES)
def test_every_dataset_module_provides_the_contract(name):
    dataset = importlib.import_module(f'refnet_jax.data.datasets.{name}').DATASET
    assert isinstance(dataset, contract.DatasetModule)
    assert isinstance(dataset, input_pipeline.PerRecordDataset)
    assert contract.missing_methods(dataset) == ()


def test_every_module_under_datasets_is_a_dataset():
    # The builders' shared code lives beside the package (refnet_jax/data/), not in it.
    assert DATASET_MODULES == ['custom', 'easy_vqa', 'hapt', 'hateful_memes', 'mm_imdb', 'uci_mfeat']


def test_a_dataset_module_that_lacks_a_method_is_refused(tmp_path, monkeypatch):
    made = []

    class HalfDone:  # no train_examples, no labeled_subset; eval_dataset is not callable
        eval_dataset = None

        def make_builder(self, data_config, *, data_dir, file_format):
            made.append(data_dir)

        def dataset_info(self, builder): ...

        def train_batches(self, examples, config, *, info, batch_size): ...

    module = types.ModuleType('refnet_jax.data.datasets.half_done')
    module.DATASET = HalfDone()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    config = ml_collections.ConfigDict({'name': 'half_done', 'data_dir': str(tmp_path)})
    with pytest.raises(ValueError) as e:
        input_pipeline.get_dataset_info(config)
    assert str(e.value).startswith(
        "config.data.name='half_done': refnet_jax.data.datasets.half_done.DATASET (HalfDone) lacks "
        'train_examples, eval_dataset, labeled_subset; expected DATASET = an object with the methods of '
        'refnet_jax.data.contract.DatasetModule (make_builder, dataset_info, train_examples, train_batches, '
        'eval_dataset, labeled_subset)'
    )
    assert not made  # refused before anything is built

    del module.DATASET
    with pytest.raises(
        ValueError, match="config.data.name='half_done': module refnet_jax.data.datasets.half_done has no"
    ):
        input_pipeline.get_dataset_info(config)


def test_per_record_dataset_needs_a_builder_and_dataset_info():
    with pytest.raises(TypeError, match='NoBuilder sets neither Builder nor make_builder'):

        class NoBuilder(input_pipeline.PerRecordDataset):
            def dataset_info(self, builder): ...

    class NoInfo(input_pipeline.PerRecordDataset):
        Builder = easy_vqa.Builder

    with pytest.raises(TypeError, match='dataset_info'):
        NoInfo()


def test_modality_info_reads_shape_and_dtype_from_the_features():
    features = {
        'pixels': tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8, encoding='bytes'),
        'rows': tfds.features.Tensor(shape=(5, 7), dtype=np.int32, encoding='bytes'),
        'vector': tfds.features.Tensor(shape=(None,), dtype=np.float32, encoding='bytes'),
    }
    builder = types.SimpleNamespace(name='fake', info=types.SimpleNamespace(features=features))
    info = input_pipeline.modality_info
    assert info(builder, 'pixels', 'image', shared=True) == contract.ModalityInfo(
        kind='image', shape=(4, 4, 3), dtype=np.uint8, shared=True
    )
    assert info(builder, 'rows', 'tokens', stacked=True, vocab_size=9) == contract.ModalityInfo(
        kind='tokens', shape=(7,), dtype=np.int32, vocab_size=9
    )
    assert info(builder, 'vector', 'features', shape=(6,)).shape == (6,)
    for shape in (None, (6, 1), (6.0,)):
        with pytest.raises(ValueError, match="feature 'vector' of fake has items of shape \\(None,\\)"):
            info(builder, 'vector', 'features', shape=shape)
    with pytest.raises(ValueError, match='shape=\\(5,\\)'):
        info(builder, 'pixels', 'image', shape=(5,))


def test_stratified_subset_keeps_each_class_share_and_depends_on_the_seed():
    labels = np.repeat(np.arange(4), [100, 40, 7, 1])
    picked = input_pipeline.stratified_subset(labels, 0.25, seed=0)
    assert np.all(np.diff(picked) > 0)
    np.testing.assert_array_equal(np.bincount(labels[picked], minlength=4), [25, 10, 2, 1])
    np.testing.assert_array_equal(input_pipeline.stratified_subset(labels, 0.25, seed=0), picked)
    assert not np.array_equal(input_pipeline.stratified_subset(labels, 0.25, seed=1), picked)
    multi_hot = np.eye(5, dtype=np.int32)[np.arange(40) % 5]
    assert len(input_pipeline.stratified_subset(multi_hot, 0.1, seed=0)) == 4


def test_label_fraction_keeps_a_stratified_share_of_the_questions(data_dir):
    config = make_config(data_dir, **{'train.batch_size': 64})
    config.seed = 0
    config.data.label_fraction = 0.1
    _, builder = input_pipeline._prepared_builder(config.data)
    source = builder.as_data_source(split='train')
    subset = easy_vqa.DATASET.labeled_subset(source, 0.1, seed=0)

    def questions(records):
        out = collections.Counter()
        for r in records:
            n = int(r['num_questions'])
            out.update(
                (r['image'].tobytes(), q.tobytes(), int(a))
                for q, a in zip(r['questions'][:n], r['answers'][:n], strict=True)
            )
        return out

    everything = questions(source[i] for i in range(len(source)))
    picked = questions(subset[i] for i in range(len(subset)))
    assert picked and not picked - everything  # only real questions, each at most as often as stored
    per_answer = collections.Counter(a for (_, _, a) in everything.elements())
    picked_per_answer = collections.Counter(a for (_, _, a) in picked.elements())
    for answer, n in per_answer.items():
        assert picked_per_answer[answer] == max(1, round(0.1 * n))
    assert all(int(subset[i]['num_questions']) >= 1 for i in range(len(subset)))

    # Training reads only the picked questions; pre-training (labeled=False) reads every image.
    iterator = input_pipeline.make_train_iterator(config, seed=0)
    for _ in range(5):
        batch = next(iterator)
        rows = collections.Counter(
            (batch['image'][i].tobytes(), q.tobytes(), int(y))
            for i, q, y in zip(batch['image_index'], batch['question'], batch['label'], strict=True)
        )
        assert not set(rows) - set(picked)
    seen = set()
    iterator = input_pipeline.make_train_iterator(config, seed=0, labeled=False)
    for _ in range(len(source) // 8 + 1):
        seen.update(image.tobytes() for image in next(iterator)['image'])
    assert len(seen) == len(source) > len(subset)


def test_label_fraction_is_checked(data_dir):
    for bad in (0.0, 1.5, '0.1', True):
        config = make_config(data_dir)
        config.seed = 0
        config.data.label_fraction = bad
        with pytest.raises(ValueError, match='config.data.label_fraction=.*expected a number in \\(0, 1\\]'):
            input_pipeline.make_train_iterator(config, seed=0)
