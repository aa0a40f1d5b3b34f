"""Tests of the `text` modality kind of the own-data path: raw strings in a table or an .npz, tokenized when the
data are prepared (a tokenizer trained on the training text, or a tokenizer file), ids and mask stored, the
tokenizer saved with the prepared data; and trained through configs/custom.py:kinds=NAME:text with no code."""

import csv
import json
import pathlib

import numpy as np
import pytest
import tokenizers as hf
from helpers import custom_config, stored_records
from tokenizers import models, normalizers, pre_tokenizers, processors

from refnet_jax import config_lib
from refnet_jax.data import contract, corruption, input_pipeline, tokenizers
from refnet_jax.data.datasets import custom
from refnet_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOOD = ('great', 'lovely', 'works well', 'excellent value', 'would buy again')
BAD = ('broken', 'awful', 'refund please', 'stopped working', 'never again')


def reviews(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows of a product-review table: `title` and `body` (raw text, commas, quotes, accents), `label`."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = i % 2
        words = GOOD if y else BAD
        rows.append(
            {
                'title': f'{rng.choice(words).capitalize()} "{rng.choice(("mixer", "kettle", "café lamp"))}"',
                'body': f'I think it is {rng.choice(words)}, {rng.choice(("really", "quite", ""))} order {i}.',
                'label': 'positive' if y else 'negative',
            }
        )
    return rows


def write_csv(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def text_config(manual_dir, data_dir, arg='kinds=title:text+body:text,tiny', **data):
    """configs/custom.py with the modalities given in its argument, as a user runs it (no code)."""
    return custom_config(manual_dir, data_dir, arg, **{'table': 'reviews.csv', **data})


@pytest.fixture(scope='module')
def table(tmp_path_factory):
    """A review table of 80 rows, prepared once: (manual_dir, data_dir, rows)."""
    root = tmp_path_factory.mktemp('text')
    rows = reviews(80)
    write_csv(root / 'reviews' / 'reviews.csv', rows)
    input_pipeline.get_dataset_info(text_config(root / 'reviews', root / 'tfds').data)
    return root / 'reviews', root / 'tfds', rows


def prepared(config):
    return input_pipeline._prepared_builder(config.data)[1]


def test_unknown_kind_is_one_plain_line():
    with pytest.raises(ValueError) as e:
        config_lib.load_file(f'{ROOT / "configs" / "custom.py"}:kinds=signal:audio')
    message = str(e.value)
    assert '\n' not in message
    assert "kinds=signal:audio: unknown kind 'audio' for modality 'signal'" in message
    assert 'expected one of image, tokens, text, series, features' in message


def test_text_table_is_tokenized_by_a_tokenizer_trained_on_the_train_split(table):
    manual_dir, data_dir, rows = table
    config = text_config(manual_dir, data_dir)
    info = input_pipeline.get_dataset_info(config.data)
    builder = prepared(config)
    metadata = builder.info.metadata['modalities']
    stored = stored_records(config.data)
    for m in ('title', 'body'):
        saved = builder.data_path / custom.tokenizer_file(m, '.model')
        tokenizer = tokenizers.load(saved)
        assert metadata[m]['tokenizer'] == {
            'file': saved.name,
            'sha256': tokenizer.sha256,
            'source': 'train',
        }
        # Trained on the train split's text alone (never validation or test): the same bytes as training on it.
        train_texts = [rows[r][m] for r in stored['train']['row']]
        assert tokenizers.train(train_texts, 8000).data == tokenizer.data
        # max_tokens: the train split's 99th percentile length.
        lengths = tokenizer.lengths(train_texts)
        assert metadata[m]['max_tokens'] == int(np.percentile(lengths, 99, method='higher'))
        assert info.modalities[m] == contract.ModalityInfo(
            kind='text',
            shape=(metadata[m]['max_tokens'],),
            dtype=np.int32,
            vocab_size=tokenizer.vocab_size,
            pad_id=0,
        )
        for split in stored.values():
            texts = [rows[r][m] for r in split['row']]
            ids, mask = tokenizer.encode(texts, metadata[m]['max_tokens'])
            np.testing.assert_array_equal(split[m], ids)
            np.testing.assert_array_equal(split[custom.mask_feature(m)], mask)
            assert (split[m][~mask] == 0).all() and (split[m][mask] != 0).all()
    batch = next(input_pipeline.make_train_iterator(config, seed=0))
    contract.check_batch(batch, info)
    assert set(batch) == {'title', 'body', 'label'}


def test_training_the_tokenizer_twice_gives_the_same_file_and_ids(table, tmp_path):
    manual_dir, data_dir, _ = table
    first, again = text_config(manual_dir, data_dir), text_config(manual_dir, tmp_path / 'again')
    a, b = prepared(first), prepared(again)
    assert a.data_path != b.data_path
    for m in ('title', 'body'):
        name = custom.tokenizer_file(m, '.model')
        assert (a.data_path / name).read_bytes() == (b.data_path / name).read_bytes()
    x, y = stored_records(first.data), stored_records(again.data)
    for split in x:
        for key in x[split]:
            np.testing.assert_array_equal(x[split][key], y[split][key])


def wordpiece(path: pathlib.Path, pad_id: int = 3) -> pathlib.Path:
    """A BERT-style WordPiece tokenizer.json whose [PAD] is id `pad_id` (not 0)."""
    words = sorted(
        {
            w.strip('.,"').lower()
            for row in reviews(80)
            for t in (row['title'], row['body'])
            for w in t.split()
        }
    )
    vocab = ['[UNK]', '[CLS]', '[SEP]']
    vocab.insert(pad_id, '[PAD]')
    vocab += [w for w in words if w and not w.isdigit()] + [',', '.', '"'] + [str(d) for d in range(10)]
    vocab += [f'##{d}' for d in range(10)]
    tokenizer = hf.Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token='[UNK]'))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab.index('[CLS]'), vocab.index('[SEP]')
    tokenizer.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]', special_tokens=[('[CLS]', cls), ('[SEP]', sep)]
    )
    tokenizer.add_special_tokens(['[UNK]', '[CLS]', '[SEP]', '[PAD]'])
    tokenizer.enable_padding(pad_id=pad_id, pad_token='[PAD]')
    tokenizer.save(str(path))
    return path


def test_a_tokenizer_file_gives_its_own_ids_and_padding_id(table, tmp_path):
    manual_dir, _, rows = table
    path = wordpiece(tmp_path / 'tokenizer.json')
    config = text_config(manual_dir, tmp_path / 'tfds', tokenizer={'title': str(path), 'body': 'train'})
    config.data.max_tokens.title = 6
    info = input_pipeline.get_dataset_info(config.data)
    assert info.modalities['title'].pad_id == 3 and info.modalities['title'].shape == (6,)
    library = hf.Tokenizer.from_file(str(path))
    library.enable_truncation(6)
    library.enable_padding(length=6, pad_id=3, pad_token='[PAD]')
    stored = stored_records(config.data)
    for split in stored.values():
        encodings = library.encode_batch([rows[r]['title'] for r in split['row']])
        np.testing.assert_array_equal(split['title'], [e.ids for e in encodings])
        np.testing.assert_array_equal(split['title_mask'], [e.attention_mask for e in encodings])
    assert (stored['train']['title_mask'] == (stored['train']['title'] != 3)).all()
    assert (stored['train']['title'][:, 0] == 1).all()  # [CLS], as the file says
    builder = prepared(config)
    assert (builder.data_path / 'tokenizer_title.json').read_bytes() == path.read_bytes()
    # The file's hash is part of the prepared data's identity: another file prepares another copy.
    wordpiece(path, pad_id=0)
    assert (
        prepared(
            text_config(manual_dir, tmp_path / 'tfds', tokenizer={'title': str(path), 'body': 'train'})
        ).data_path
        != builder.data_path
    )


def test_missing_or_broken_tokenizer_files_are_refused_before_any_work(table, tmp_path):
    manual_dir, _, _ = table
    config = text_config(manual_dir, tmp_path / 'tfds', tokenizer={'title': 'nowhere.json', 'body': 'train'})
    with pytest.raises(FileNotFoundError) as e:
        input_pipeline.get_dataset_info(config.data)
    assert "config.data.tokenizer.title='nowhere.json': no file" in str(e.value)
    (tmp_path / 'bad.model').write_bytes(b'\x00 not a sentencepiece model')
    config = text_config(
        manual_dir, tmp_path / 'tfds', tokenizer={'title': 'train', 'body': str(tmp_path / 'bad.model')}
    )
    with pytest.raises(ValueError) as e:
        input_pipeline.get_dataset_info(config.data)
    assert (
        f"config.data.tokenizer.body='{tmp_path / 'bad.model'}' cannot be read as a sentencepiece .model"
        in str(e.value)
    )
    assert not (tmp_path / 'tfds').exists()


def test_text_arrays(tmp_path):
    rows = reviews(40)
    (tmp_path / 'data').mkdir()
    texts = np.array([r['body'] for r in rows])
    labels = np.arange(40) % 2
    np.savez(tmp_path / 'data' / 'train.npz', body=texts, label=labels)
    config = config_lib.load_file(f'{ROOT / "configs" / "custom.py"}:kinds=body:text,tiny')
    config.data.manual_dir, config.data.data_dir = str(tmp_path / 'data'), str(tmp_path / 'tfds')
    config.data.max_tokens.body = 4
    info = input_pipeline.get_dataset_info(config.data)
    assert info.modalities['body'].shape == (4,) and info.modalities['body'].kind == 'text'
    stored = stored_records(config.data)
    tokenizer = tokenizers.load(prepared(config).data_path / 'tokenizer_body.model')
    ids, mask = tokenizer.encode(texts[stored['test']['row']].tolist(), 4)
    np.testing.assert_array_equal(stored['test']['body'], ids)
    assert mask.all()  # every review is longer than 4 pieces: cut
    # Bytes are read as UTF-8; invalid UTF-8 is refused naming the file, the row and the array.
    raw = np.array([t.encode() for t in texts])
    raw[7] = b'caf\xe9 au lait'
    np.savez(tmp_path / 'data' / 'train.npz', body=raw, label=labels)
    with pytest.raises(ValueError) as e:
        input_pipeline.get_dataset_info(config.data)
    assert f"{tmp_path / 'data' / 'train.npz'} row 7: array 'body' is not valid UTF-8" in str(e.value)
    # A number array where text is expected: refused from the header.
    np.savez(tmp_path / 'data' / 'train.npz', body=labels.astype(float), label=labels)
    with pytest.raises(
        ValueError, match=r"array 'body' holds float64 items of shape \(\); config.data.kinds.body='text'"
    ):
        input_pipeline.get_dataset_info(config.data)


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize('fusion', ['concat', 'mmft'])
def test_two_text_columns_train_and_evaluate_with_no_code(table, tmp_path, fusion):
    manual_dir, data_dir, _ = table
    config = text_config(manual_dir, data_dir, arg=f'kinds=title:text+body:text,tiny,fusion={fusion}')
    config.mesh.data = 1
    config.train.num_steps = 60 if fusion == 'concat' else 4
    config.train.learning_rate = 1e-2
    results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['step'] == config.train.num_steps and np.isfinite(results['train']['loss'])
    assert results['test']['num_examples'] == 8 and {'refiner_loss/title', 'refiner_loss/body'} <= set(
        results['train']
    )
    if fusion == 'concat':  # the words tell the label apart
        assert results['test']['accuracy'] == 1.0, results
    assert json.loads((tmp_path / 'run' / 'results.json').read_text())['step'] == config.train.num_steps


def test_masking_text_for_robustness_pads_with_its_padding_id():
    info = contract.ModalityInfo(kind='text', shape=(4,), dtype=np.int32, vocab_size=10, pad_id=3)
    batch = {'t': np.array([[5, 6, 7, 8]], np.int32), 'label': np.zeros(1, np.int32)}
    out = corruption.corrupt(batch, 't', info, 'mask', 1.0, np.random.default_rng(0))
    assert out['t'].tolist() == [[3, 3, 3, 3]]
    assert not corruption.applies('noise', info) and corruption.applies('mask', info)
