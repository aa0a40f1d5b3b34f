"""Tests of the Hateful Memes builder on small fixtures written in the release's layout (the real data are gated).

A fixture is a manual directory like the release's: `train.jsonl`, `dev_seen.jsonl`, `test_seen.jsonl` (one JSON
object per line: id, img, label, text) and `img/` with PNG images of varying sizes and modes, plus a
`features.npz` for the `features` builder config. The good fixture is prepared once per module; each bad-data
case copies it, breaks one thing and prepares into a fresh data directory.
"""

import json
import os
import shutil
import time

import jax
import numpy as np
import optax
import pytest
from helpers import stored_records
from PIL import Image
from sklearn.metrics import roc_auc_score

from configs import hateful_memes as hateful_memes_config
from refnet_jax.data import contract, input_pipeline
from refnet_jax.data.datasets import hateful_memes
from refnet_jax.models import model as model_lib
from refnet_jax.train import checkpointing, metrics, objective, sharding, trainer

SPLIT_SIZES = {'train.jsonl': 40, 'dev_seen.jsonl': 10, 'test_seen.jsonl': 10}
SPLITS = {'train': 'train.jsonl', 'validation': 'dev_seen.jsonl', 'test': 'test_seen.jsonl'}
# 'Cat' and 'cat' are one word; "don't" keeps its apostrophe; 'dog' is the most frequent train word.
TRAIN_WORDS = ('Cat', 'cat', 'dog', 'dog', 'dog', 'love', 'hate', "don't", 'the', 'the')
UNSEEN_WORD = 'zebra'  # only in dev and test texts: unknown to the vocabulary
MODES = ('RGB', 'RGBA', 'L', 'P')
FEATURE_DIMS = {'image': 6, 'text': 5}


def _image(rng, height: int, width: int, mode: str, solid: bool) -> tuple[Image.Image, np.ndarray]:
    """A smooth RGB gradient (or a solid colour) as a PIL image of `mode`, and its RGB content (H, W, 3)."""
    if solid:
        rgb = np.broadcast_to(rng.integers(0, 256, 3), (height, width, 3)).astype(np.uint8)
    else:
        i, j = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing='ij')
        a, b, c = rng.random((3, 3))
        rgb = (255 * (a * i[..., None] + b * j[..., None] + c) / (a + b + c)).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == 'RGBA':
        image.putalpha(128)  # alpha is dropped: the RGB content stays
    elif mode == 'L':
        image = image.convert('L')
    elif mode == 'P':
        image = image.quantize(64)
    return image, np.asarray(image.convert('RGB'))


def write_fixture(root, sizes=SPLIT_SIZES, seed: int = 0) -> dict:
    """Writes a manual directory in the release's layout into `root`.

    Returns {'lines': {file: [dict per line]}, 'rgb': {id: (H, W, 3) uint8 content of its image}}.
    """
    rng = np.random.default_rng(seed)
    (root / 'img').mkdir(parents=True)
    lines, rgb = {}, {}
    next_id = 1234  # ids below 10,000 have zero-padded file names, as in the release ("img/01234.png")
    for file, n in sizes.items():
        labels = rng.permutation(np.arange(n) % 2)  # both classes in every split (AUROC needs them)
        words = TRAIN_WORDS if file == 'train.jsonl' else (*TRAIN_WORDS, UNSEEN_WORD)
        lines[file] = []
        for k in range(n):
            meme_id = next_id
            next_id += int(rng.integers(1, 3000))
            image, rgb[meme_id] = _image(
                rng, int(rng.integers(20, 90)), int(rng.integers(20, 90)), MODES[k % len(MODES)], solid=k == 0
            )
            image.save(root / 'img' / f'{meme_id:05d}.png')
            text = ' '.join(rng.choice(words, int(rng.integers(1, 9))))
            if k == 1:
                text = f'{text}, OK? ' + ' '.join(['cat'] * hateful_memes.MAX_TOKENS)  # truncated
            if k == 2 and file != 'train.jsonl':
                text = f'{UNSEEN_WORD} {text}'
            lines[file].append(
                {'id': meme_id, 'img': f'img/{meme_id:05d}.png', 'label': int(labels[k]), 'text': text}
            )
        write_lines(root / file, lines[file])
    return {'lines': lines, 'rgb': rgb}


def write_lines(path, records) -> None:
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def write_features(root, ids, seed: int = 0) -> dict[str, np.ndarray]:
    """`features.npz` with a row for each of `ids` in shuffled order and two extra rows; returns its arrays."""
    rng = np.random.default_rng(seed)
    all_ids = rng.permutation([*ids, 1, 2])
    arrays = {'id': all_ids, **{m: rng.normal(size=(len(all_ids), d)) for m, d in FEATURE_DIMS.items()}}
    np.savez(root / 'features.npz', **arrays)
    return arrays


def make_config(manual_dir, data_dir, arg: str = 'tiny'):
    config = hateful_memes_config.get_config(arg)
    config.data.manual_dir = str(manual_dir)
    config.data.data_dir = str(data_dir)
    return config


@pytest.fixture(scope='module')
def fixture(tmp_path_factory):
    """The good fixture, prepared (raw and features) once: (manual_dir, data_dir, written)."""
    manual_dir = tmp_path_factory.mktemp('hateful_memes_manual')
    written = write_fixture(manual_dir)
    written['features'] = write_features(manual_dir, list(written['rgb']))
    data_dir = tmp_path_factory.mktemp('hateful_memes_tfds')
    for arg in ('tiny', 'tiny,features'):
        input_pipeline.get_dataset_info(make_config(manual_dir, data_dir, arg).data)
    return manual_dir, data_dir, written


def records(config) -> dict[str, dict[str, np.ndarray]]:
    return stored_records(config.data)


def metadata(config):
    return input_pipeline._prepared_builder(config.data)[1].info.metadata


def test_dataset_info(fixture):
    manual_dir, data_dir, _ = fixture
    config = make_config(manual_dir, data_dir)
    info = input_pipeline.get_dataset_info(config.data)
    vocabulary = metadata(config)['vocabulary']
    assert info.name == 'hateful_memes'
    assert info.num_examples == {'train': 40, 'validation': 10, 'test': 10}
    assert info.num_classes == 2 and not info.multi_label
    assert info.class_names == ('not_hateful', 'hateful')
    batch = next(input_pipeline.make_train_iterator(config, seed=0))
    assert batch['image'].shape == (64, 64, 64, 3) and batch['image'].dtype == np.uint8
    assert batch['text'].shape == (64, hateful_memes.MAX_TOKENS) and batch['text'].dtype == np.int32
    assert batch['label'].dtype == np.int32 and set(batch['label'].tolist()) == {0, 1}
    contract.check_batch(batch, info)
    assert info.modalities == {
        'image': contract.ModalityInfo(kind='image', shape=(64, 64, 3), dtype=np.uint8),
        'text': contract.ModalityInfo(
            kind='tokens', shape=(hateful_memes.MAX_TOKENS,), dtype=np.int32, vocab_size=len(vocabulary)
        ),
    }


def test_records_follow_the_files_in_order(fixture):
    manual_dir, data_dir, written = fixture
    stored = records(make_config(manual_dir, data_dir))
    for split, file in SPLITS.items():
        lines = written['lines'][file]
        assert stored[split]['id'].tolist() == [r['id'] for r in lines]
        assert stored[split]['label'].tolist() == [r['label'] for r in lines]


def test_images_are_decoded_and_resized(fixture):
    manual_dir, data_dir, written = fixture
    stored = records(make_config(manual_dir, data_dir))
    for split, file in SPLITS.items():
        images = stored[split]['image']
        assert images.shape == (SPLIT_SIZES[file], 64, 64, 3) and images.dtype == np.uint8
        for k, (meme_id, image) in enumerate(zip(stored[split]['id'].tolist(), images, strict=True)):
            source = written['rgb'][meme_id]
            if k == 0:  # a solid colour stays exactly that colour, whatever the size
                np.testing.assert_array_equal(image, np.broadcast_to(source[0, 0], image.shape))
                continue
            # An independent reference: nearest-neighbour sampling of the smooth gradient, in NumPy.
            rows = ((np.arange(64) + 0.5) * source.shape[0] / 64).astype(int)
            cols = ((np.arange(64) + 0.5) * source.shape[1] / 64).astype(int)
            diff = np.abs(image.astype(int) - source[rows][:, cols].astype(int))
            largest = 40 if MODES[k % len(MODES)] == 'P' else 12  # a 64-colour palette has steps
            assert diff.mean() < 2 and diff.max() <= largest, (split, k, diff.mean(), diff.max())
            if k % len(MODES) == 2:  # written as grayscale
                assert (image == image[..., :1]).all()


def test_text_is_tokenized_with_the_train_vocabulary(fixture):
    manual_dir, data_dir, written = fixture
    config = make_config(manual_dir, data_dir)
    stored = records(config)
    meta = metadata(config)
    vocabulary = meta['vocabulary']
    # Pad, unknown, then train words by frequency (ties alphabetical); 'Cat' is 'cat'; no dev/test word.
    assert vocabulary[:2] == ['<pad>', '<oov>']
    train_words = [w for r in written['lines']['train.jsonl'] for w in hateful_memes.split_words(r['text'])]
    counts = {w: train_words.count(w) for w in set(train_words)}
    assert vocabulary[2:] == sorted(counts, key=lambda w: (-counts[w], w))
    assert set(vocabulary[2:]) == {'cat', 'dog', 'love', 'hate', "don't", 'the', 'ok'}
    assert UNSEEN_WORD not in vocabulary
    max_tokens = hateful_memes.MAX_TOKENS
    for split, file in SPLITS.items():
        tokens = stored[split]['text']
        assert tokens.shape == (SPLIT_SIZES[file], max_tokens) and tokens.dtype == np.int32
        for line, ids in zip(written['lines'][file], tokens, strict=True):
            words = line['text'].lower().replace(',', ' ').replace('?', ' ').split()[:max_tokens]
            expected = [w if w in vocabulary else '<oov>' for w in words]
            assert hateful_memes.detokenize(ids, vocabulary).split() == expected
            assert (ids[len(words) :] == 0).all() and (ids[: len(words)] > 0).all()
        assert (tokens == 1).any() == (split != 'train')  # the unseen word
        assert (tokens[1] != 0).all()  # the long text fills every position
    assert meta['truncated_texts'] == {'train': 1, 'validation': 1, 'test': 1}


def test_vocabulary_cap_and_words():
    texts = ['b b a', 'c a b', 'd']
    assert hateful_memes.build_vocabulary(texts, max_size=4) == ['<pad>', '<oov>', 'b', 'a']
    assert hateful_memes.build_vocabulary(texts)[2:] == ['b', 'a', 'c', 'd']
    assert hateful_memes.split_words("Don't PANIC: it's 42 'quoted'") == [
        "don't",
        'panic',
        "it's",
        '42',
        'quoted',
    ]
    ids = hateful_memes.tokenize('b x a', {'<pad>': 0, '<oov>': 1, 'b': 2, 'a': 3})
    assert ids.tolist() == [2, 1, 3] + [0] * (hateful_memes.MAX_TOKENS - 3)
    with pytest.raises(ValueError, match='max_size=1, expected at least 2'):
        hateful_memes.build_vocabulary(texts, max_size=1)


def test_features_config_stores_the_users_vectors(fixture):
    manual_dir, data_dir, written = fixture
    config = make_config(manual_dir, data_dir, 'tiny,features')
    info = input_pipeline.get_dataset_info(config.data)
    assert info.modalities == {
        m: contract.ModalityInfo(kind='features', shape=(d,), dtype=np.float32)
        for m, d in FEATURE_DIMS.items()
    }
    assert info.num_examples == {'train': 40, 'validation': 10, 'test': 10}
    arrays = written['features']
    row = {int(i): r for r, i in enumerate(arrays['id'])}
    for split, file in SPLITS.items():
        r = records(config)[split]
        assert r['id'].tolist() == [line['id'] for line in written['lines'][file]]
        for m in FEATURE_DIMS:
            assert r[m].dtype == np.float32
            np.testing.assert_allclose(r[m], arrays[m][[row[i] for i in r['id'].tolist()]], rtol=1e-6)
    batch = next(input_pipeline.make_train_iterator(config, seed=0))
    assert batch['image'].shape == (64, 6) and batch['text'].shape == (64, 5)
    contract.check_batch(batch, info)


def test_optional_unseen_splits(tmp_path, fixture):
    manual_dir, _, written = fixture
    shutil.copytree(manual_dir, tmp_path / 'manual')
    write_lines(tmp_path / 'manual' / 'test_unseen.jsonl', written['lines']['test_seen.jsonl'][:4])
    info = input_pipeline.get_dataset_info(make_config(tmp_path / 'manual', tmp_path / 'tfds').data)
    assert info.num_examples == {'train': 40, 'validation': 10, 'test': 10, 'test_unseen': 4}


def _edit_line(file, number, edit):
    """Returns a function that replaces line `number` (1-based) of `file` in a manual directory by edit(line)."""

    def apply(root, written):
        lines = (root / file).read_text().splitlines(keepends=True)
        lines[number - 1] = edit(json.loads(lines[number - 1])) + '\n'
        (root / file).write_text(''.join(lines))

    return apply


def _image_path(root, written, file, number):
    return root / written['lines'][file][number - 1]['img']


def _id(written, file, number):
    return written['lines'][file][number - 1]['id']


BAD_DATA = {
    'missing files': (
        lambda root, w: [(root / 'dev_seen.jsonl').unlink(), shutil.rmtree(root / 'img')],
        FileNotFoundError,
        lambda root, w: (
            rf'missing in the manual directory {root}: dev_seen\.jsonl, img/ \(it holds .*\); '
            r'.*--config\.data\.manual_dir'
        ),
    ),
    'not JSON': (
        _edit_line('train.jsonl', 3, lambda r: json.dumps(r)[:-5]),
        ValueError,
        lambda root, w: rf'{root}/train\.jsonl line 3: not JSON',
    ),
    'lacks a field': (
        _edit_line('dev_seen.jsonl', 2, lambda r: json.dumps({k: v for k, v in r.items() if k != 'text'})),
        ValueError,
        lambda root, w: rf'dev_seen\.jsonl line 2 \(id {_id(w, "dev_seen.jsonl", 2)}\): lacks field text',
    ),
    'label not 0/1': (
        _edit_line('test_seen.jsonl', 4, lambda r: json.dumps({**r, 'label': 2})),
        ValueError,
        lambda root, w: (
            rf'test_seen\.jsonl line 4 \(id {_id(w, "test_seen.jsonl", 4)}\): field label=2, expected 0 or 1'
        ),
    ),
    'label a string': (
        _edit_line('train.jsonl', 7, lambda r: json.dumps({**r, 'label': '1'})),
        ValueError,
        lambda root, w: (
            rf"train\.jsonl line 7 \(id {_id(w, 'train.jsonl', 7)}\): field label='1', expected 0 or 1"
        ),
    ),
    'image missing': (
        lambda root, w: _image_path(root, w, 'train.jsonl', 5).unlink(),
        FileNotFoundError,
        lambda root, w: (
            rf'train\.jsonl line 5 \(id {_id(w, "train.jsonl", 5)}\): image '
            rf'{_image_path(root, w, "train.jsonl", 5)} \(field img=.*\) not found'
        ),
    ),
    'image truncated': (
        lambda root, w: _image_path(root, w, 'test_seen.jsonl', 6).write_bytes(
            _image_path(root, w, 'test_seen.jsonl', 6).read_bytes()[:120]
        ),
        ValueError,
        lambda root, w: (
            rf'test_seen\.jsonl line 6 \(id {_id(w, "test_seen.jsonl", 6)}\): image '
            rf'{_image_path(root, w, "test_seen.jsonl", 6)} cannot be decoded'
        ),
    ),
    'image not an image': (
        lambda root, w: _image_path(root, w, 'dev_seen.jsonl', 1).write_text('not a PNG'),
        ValueError,
        lambda root, w: (
            rf'dev_seen\.jsonl line 1 \(id {_id(w, "dev_seen.jsonl", 1)}\): image '
            rf'{_image_path(root, w, "dev_seen.jsonl", 1)} cannot be decoded'
        ),
    ),
}


@pytest.mark.parametrize('case', list(BAD_DATA))
def test_bad_data_is_named(tmp_path, fixture, case):
    manual_dir, _, written = fixture
    root = tmp_path / 'manual'
    shutil.copytree(manual_dir, root)
    breaks, error, message = BAD_DATA[case]
    breaks(root, written)
    with pytest.raises(error, match=message(root, written)):
        input_pipeline.get_dataset_info(make_config(root, tmp_path / 'tfds').data)


def test_a_failed_preparation_leaves_nothing_that_passes_for_prepared(tmp_path, fixture):
    manual_dir, _, written = fixture
    root = tmp_path / 'manual'
    shutil.copytree(manual_dir, root)
    image = _image_path(root, written, 'test_seen.jsonl', 3)
    good = image.read_bytes()
    image.write_bytes(good[:100])
    config = make_config(root, tmp_path / 'tfds')
    with pytest.raises(ValueError, match='cannot be decoded'):
        input_pipeline.get_dataset_info(config.data)
    image.write_bytes(good)
    assert input_pipeline.get_dataset_info(config.data).num_examples['test'] == 10


def test_missing_manual_directory_and_features_are_named(tmp_path, fixture):
    with pytest.raises(
        FileNotFoundError, match=r'(?s)nowhere does not exist or is empty.*--config\.data\.manual_dir'
    ):
        input_pipeline.get_dataset_info(make_config(tmp_path / 'nowhere', tmp_path / 'tfds').data)
    manual_dir, _, written = fixture
    root = tmp_path / 'manual'
    shutil.copytree(manual_dir, root)
    (root / 'features.npz').unlink()
    shutil.rmtree(root / 'img')  # not needed by the features config
    config = make_config(root, tmp_path / 'tfds', 'tiny,features')
    with pytest.raises(
        FileNotFoundError,
        match=r'\(features\): missing in the manual directory .*: features\.npz \(it holds ',
    ):
        input_pipeline.get_dataset_info(config.data)
    keep = written['features']['id'] != _id(written, 'dev_seen.jsonl', 9)
    np.savez(root / 'features.npz', **{k: v[keep] for k, v in written['features'].items()})
    with pytest.raises(
        ValueError,
        match=rf'features\.npz: no row for id {_id(written, "dev_seen.jsonl", 9)} \(.*dev_seen\.jsonl line 9\)',
    ):
        input_pipeline.get_dataset_info(config.data)
    config.data.builder_config = 'pixels'
    with pytest.raises(
        ValueError, match=r"config.data.builder_config='pixels', expected one of \('raw', 'features'\)"
    ):
        input_pipeline.get_dataset_info(config.data)


@pytest.mark.parametrize(
    'arrays,message',
    [
        (dict(id=[1, 2], image=np.ones((2, 3))), r'lacks array text'),
        (
            dict(id=[1.0, 2.0], image=np.ones((2, 3)), text=np.ones((2, 2))),
            r'array id .* expected \(N,\) integers',
        ),
        (dict(id=[1, 1], image=np.ones((2, 3)), text=np.ones((2, 2))), r'array id repeats id 1'),
        (
            dict(id=[1, 2], image=np.ones((3, 3)), text=np.ones((2, 2))),
            r'array image has shape \(3, 3\).*\(2, D\)',
        ),
        (dict(id=[1, 2], image=np.ones((2, 3)), text=[[1, 0], [np.nan, 0]]), r'array text .* row of id 2'),
    ],
)
def test_bad_features_file_is_named(tmp_path, arrays, message):
    np.savez(tmp_path / 'features.npz', **{k: np.asarray(v) for k, v in arrays.items()})
    with pytest.raises(ValueError, match=rf'features\.npz:? {message}'):
        hateful_memes.load_features(tmp_path / 'features.npz')
    (tmp_path / 'features.npz').write_text('not a zip file')
    with pytest.raises(ValueError, match=r'features\.npz cannot be read as a NumPy \.npz file'):
        hateful_memes.load_features(tmp_path / 'features.npz')


def test_prepare_twice_reuses_the_prepared_copy(fixture, tmp_path):
    manual_dir, data_dir, _ = fixture
    version_dir = data_dir / 'hateful_memes' / 'raw' / '1.0.0'
    before = {f: os.stat(f).st_mtime_ns for f in sorted(version_dir.iterdir())}
    start = time.perf_counter()
    # The manual files are not read again: a prepared copy needs none.
    info = input_pipeline.get_dataset_info(make_config(tmp_path / 'gone', data_dir).data)
    assert time.perf_counter() - start < 1.0
    assert info.num_examples['train'] == 40
    assert {f: os.stat(f).st_mtime_ns for f in sorted(version_dir.iterdir())} == before


def test_config_variants():
    base = hateful_memes_config.get_config()
    assert base.model.fusion.kind == 'concat' and base.data.builder_config == 'raw'
    assert base.loss.ms_weight > 0 and set(base.loss.refiner_weights) == {'image', 'text'}
    assert set(base.model.encoders.image) == {'module', 'features', 'embed_dim', 'pooling', 'init_from'}
    features = hateful_memes_config.get_config('features,variant=baseline,fusion=transformer')
    assert features.data.builder_config == 'features' and features.model.fusion.kind == 'transformer'
    assert features.loss.ms_weight == 0 and set(features.model.encoders.text) == {
        'module',
        'hidden',
        'embed_dim',
        'init_from',
    }
    only = hateful_memes_config.get_config('only=text,tiny')
    assert tuple(only.data.modalities) == ('text',) and list(only.model.encoders) == ['text']
    with pytest.raises(ValueError, match="'pixels' not understood"):
        hateful_memes_config.get_config('pixels')


@pytest.mark.slow
@pytest.mark.parametrize('arg', ['tiny', 'tiny,features'])
def test_tiny_config_trains_and_reports_the_aurocs_of_its_predictions(tmp_path, fixture, arg):
    manual_dir, data_dir, written = fixture
    config = make_config(manual_dir, data_dir, arg)
    config.train.num_steps = 2
    config.mesh.data = 1  # one device compiles faster
    workdir = tmp_path / 'run'
    results = trainer.train_and_evaluate(config, str(workdir))
    assert results['step'] == 2 and np.isfinite(results['train']['loss'])

    # The trained model's predictions, recomputed from its checkpoint, scored by scikit-learn.
    info = input_pipeline.get_dataset_info(config.data)
    model = model_lib.create_model(config, info)
    params = checkpointing.Checkpointer(workdir / 'checkpoints').restore_params()
    state = trainer.TrainState.create(apply_fn=model.apply, params=params, tx=optax.identity())
    mesh = sharding.make_mesh(config, devices=jax.devices()[:1])
    for key, split in (('val', 'validation'), ('test', 'test')):
        logits, labels = [], []
        with jax.set_mesh(mesh):
            for batch in input_pipeline.eval_batches(config, split):
                out = trainer.eval_step(
                    state, sharding.shard_batch(batch, mesh), objective.Supervised(config)
                )
                out = np.asarray(out['logits'])
                logits.append(out[batch['mask']])
                labels.append(batch['label'][batch['mask']])
        logits, labels = np.concatenate(logits).astype(np.float64), np.concatenate(labels)
        assert labels.tolist() == [r['label'] for r in written['lines'][SPLITS[split]]]
        scores = logits[:, 1] - logits[:, 0]
        assert len(np.unique(scores)) == len(scores)  # real, distinct predictions: not a trivial 0.5
        assert results[key]['num_examples'] == 10
        assert results[key]['auroc'] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
        assert results[key]['auroc'] == pytest.approx(metrics.roc_auc(scores, labels), abs=1e-12)
        assert results[key]['accuracy'] == pytest.approx(np.mean(logits.argmax(-1) == labels), abs=1e-9)
