"""Tests of own-data tables beyond CSV (refnet_jax/data/tables.py, custom_values.py): JSON Lines, Parquet and a
directory of shards give the same prepared data as the CSV; chunked reading and parallel image decoding change
nothing; long preparations report progress; bad input is refused naming the file, the row and the column, with
nothing prepared left behind; and easy-VQA written as a table of image paths and questions trains with no code."""

import csv
import json
import logging
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import custom_config, stored_records
from PIL import Image

from refnet_jax import config_lib
from refnet_jax.data import custom_values, input_pipeline, tables
from refnet_jax.data.datasets import custom
from refnet_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARG = 'kinds=photo:image+review:text+meta:features,tiny'


def rows(n: int = 36) -> list[dict]:
    """Rows of a product table: a photo (a file path), a review (raw text), three numbers, a label, a split."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        y = ('good', 'bad', 'meh')[i % 3]
        out.append(
            {
                'photo': f'img/{i}.png',
                'review': f'{y} {rng.choice(("blender", "toaster", "crème brûlée torch"))}, item {i}',
                'meta_0': float(rng.normal()),
                'meta_1': float(rng.normal(5, 2)),
                'meta_2': float(i % 4),
                'label': y,
                'part': 'validation' if i % 9 == 4 else 'train',
            }
        )
    return out


def write_images(root: pathlib.Path, n: int) -> np.ndarray:
    """img/<i>.png in solid colours (they stay that colour when resized); returns the colours."""
    (root / 'img').mkdir(parents=True, exist_ok=True)
    colours = np.random.default_rng(1).integers(0, 256, (n, 3))
    for i, c in enumerate(colours):
        Image.fromarray(np.broadcast_to(c, (10, 14, 3)).astype(np.uint8)).save(root / 'img' / f'{i}.png')
    return colours


def write(path: pathlib.Path, table: list[dict]) -> pathlib.Path:
    """`table` as the format of `path`'s extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == '.csv':
        with open(path, 'w', newline='', encoding='utf-8') as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    elif path.suffix == '.jsonl':
        path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in table), encoding='utf-8')
    else:
        pq.write_table(pa.Table.from_pylist(table), path, row_group_size=5)
    return path


def config_for(manual_dir, data_dir, table, arg=ARG, **data):
    return custom_config(manual_dir, data_dir, arg, table=table, image_size=8, split_column='part', **data)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The CSV table prepared: (root, stored records)."""
    root = tmp_path_factory.mktemp('tables')
    table = rows()
    colours = write_images(root, len(table))
    write(root / 'data.csv', table)
    config = config_for(root, root / 'tfds', 'data.csv')
    stored = stored_records(config.data)
    return root, stored, colours


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for split in a:
        assert sorted(a[split]) == sorted(b[split])
        for key in a[split]:
            np.testing.assert_array_equal(a[split][key], b[split][key], err_msg=f'{split}/{key}')


def test_the_csv_table(reference):
    root, stored, colours = reference
    table = rows()
    assert {split: len(s['row']) for split, s in stored.items()} == {'train': 29, 'validation': 4, 'test': 3}
    for split in stored.values():
        r = split['row']
        np.testing.assert_array_equal(
            split['photo'], np.broadcast_to(colours[r][:, None, None], (len(r), 8, 8, 3))
        )
        assert split['label'].tolist() == [('bad', 'good', 'meh').index(table[i]['label']) for i in r]
        assert split['review'].shape[1] == split['review_mask'].shape[1]


@pytest.mark.parametrize('name', ['data.jsonl', 'data.parquet', 'shards'])
def test_json_lines_parquet_and_shards_give_the_same_data(reference, tmp_path, name):
    root, stored, _ = reference
    table = rows()
    if name == 'shards':  # three Parquet shards, read in name order
        for k, start in enumerate((0, 10, 25)):
            write(root / 'shards' / f'part-{k:03d}.parquet', table[start : (10, 25, 36)[k]])
        # Images are relative to the shards' directory.
        (root / 'shards' / 'img').symlink_to(root / 'img', target_is_directory=True)
    else:
        write(root / name, table)
    assert_same(stored, stored_records(config_for(root, tmp_path, name).data))


def test_chunked_reading_and_parallel_decoding_change_nothing(reference, tmp_path, monkeypatch, caplog):
    root, stored, _ = reference
    monkeypatch.setattr(tables, 'CHUNK_ROWS', 5)  # chunks end inside each split and each class
    monkeypatch.setattr(custom, 'PARALLEL_IMAGES', 1)
    monkeypatch.setattr(custom, 'IMAGE_WORKERS', 2)  # spawned processes decode the images
    monkeypatch.setattr(custom_values, 'PROGRESS_SECONDS', 0.0)
    pools = []
    real = custom.concurrent.futures.ProcessPoolExecutor

    def pool(*args, **kwargs):
        pools.append(real(*args, **kwargs))
        return pools[-1]

    monkeypatch.setattr(custom.concurrent.futures, 'ProcessPoolExecutor', pool)
    with caplog.at_level(logging.INFO):
        chunked = stored_records(config_for(root, tmp_path, 'data.csv').data)
    assert_same(stored, chunked)
    assert len(pools) == 1 and pools[0]._max_workers == 2
    progress = [r.getMessage() for r in caplog.records if 'rows/s' in r.getMessage()]
    assert any('writing train: ' in line and ' of 29 rows' in line for line in progress), progress
    assert any('checking: ' in line and ' of 36 rows' in line for line in progress), progress


def test_moments_over_chunks_equal_the_whole():
    x = np.random.default_rng(0).normal(3, 2, (101, 4))
    moments = custom_values.Moments()
    for start in range(0, 101, 17):
        moments.add(x[start : start + 17])
    mean, std = moments.result()
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-12)


# --- Bad input: one plain line naming the file, the row and the column; nothing prepared left behind ---


def refused(config, error=ValueError) -> str:
    with pytest.raises(error) as e:
        input_pipeline.get_dataset_info(config.data)
    message = str(e.value)
    assert '\n' not in message
    prepared = pathlib.Path(config.data.data_dir) / 'custom'
    assert not prepared.exists() or not any(
        (p / '1.0.0' / 'dataset_info.json').exists() for p in prepared.iterdir()
    )
    return message


def test_a_text_cell_that_is_not_a_string(reference, tmp_path):
    root, _, _ = reference
    table = rows()
    table[7]['review'] = 42
    write(root / 'bad.jsonl', table)
    message = refused(config_for(root, tmp_path, 'bad.jsonl'))
    assert (
        f"{root / 'bad.jsonl'} row 7 (line 8): column 'review' is 42; modality 'review' of kind 'text' expects a string"
        in message
    )
    table[7]['review'] = None
    write(root / 'bad.jsonl', table)
    assert "row 7 (line 8): column 'review' is null; modality 'review'" in refused(
        config_for(root, tmp_path, 'bad.jsonl')
    )


def test_invalid_utf8(reference, tmp_path):
    root, _, _ = reference
    path = write(root / 'bad.csv', rows())
    lines = path.read_bytes().split(b'\n')
    lines[4] = (
        lines[4].replace(b'good', b'g\xf6od', 1)
        if b'good' in lines[4]
        else lines[4].replace(b'bad', b'b\xe4d', 1)
    )
    path.write_bytes(b'\n'.join(lines))
    message = refused(config_for(root, tmp_path, 'bad.csv'))
    assert f"{path} row 3 (line 5): column 'review' is not valid UTF-8" in message


def test_an_empty_table(reference, tmp_path):
    root, _, _ = reference
    (root / 'empty.csv').write_text('photo,review,meta_0,meta_1,meta_2,label,part\n\n')
    assert f'{root / "empty.csv"} holds a header but no rows' in refused(
        config_for(root, tmp_path, 'empty.csv')
    )
    (root / 'empty.jsonl').write_text('\n')
    assert f'{root / "empty.jsonl"}: header [] has repeated or empty column names' in refused(
        config_for(root, tmp_path, 'empty.jsonl')
    )
    pq.write_table(pa.Table.from_pylist(rows()).slice(0, 0), root / 'empty.parquet')
    assert f'{root / "empty.parquet"} holds no rows' in refused(config_for(root, tmp_path, 'empty.parquet'))


def test_a_parquet_column_of_another_type(reference, tmp_path):
    root, _, _ = reference
    table = rows()
    for i, r in enumerate(table):
        r['review'] = i  # int64 where text is expected
    write(root / 'typed.parquet', table)
    message = refused(config_for(root, tmp_path, 'typed.parquet'))
    assert (
        f"{root / 'typed.parquet'} row 0: column 'review' is 0 (a Parquet int64 column); modality 'review' of kind "
        "'text' expects a string" in message
    )
    table = rows()
    for r in table:
        r['meta_1'] = str(r['meta_1']) + ' kg'
    write(root / 'typed.parquet', table)
    message = refused(config_for(root, tmp_path, 'typed.parquet'))
    assert (
        "row 0: column 'meta_1' is '" in message
        and "(a Parquet string column); modality 'meta' of kind 'features' expects numbers" in message
    )


def test_a_table_of_another_format_or_a_mixed_directory(reference, tmp_path):
    root, _, _ = reference
    (root / 'data.tsv').write_text('a\tb\n')
    assert "a table is a .csv, .jsonl, .parquet file or a directory of them, not '.tsv'" in refused(
        config_for(root, tmp_path, 'data.tsv')
    )
    write(root / 'mixed' / 'a.csv', rows()[:3])
    write(root / 'mixed' / 'b.jsonl', rows()[3:])
    assert "a directory table holds shards of several formats ['.csv', '.jsonl']" in refused(
        config_for(root, tmp_path, 'mixed')
    )


# --- Image + text: easy-VQA as a table ---


@pytest.mark.slow(seconds=120)
def test_easy_vqa_as_a_table_of_image_paths_and_questions_trains_with_no_code(tmp_path):
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    keep = [i for i, image in enumerate(image_ids) if image < 400]  # 400 images and their ~3,900 questions
    table = [
        {'image': paths[image_ids[i]], 'question': questions[i], 'answer': answers[i]} for i in keep
    ]  # absolute image paths: a path is relative to the table's directory, or absolute
    write(tmp_path / 'vqa' / 'questions.csv', table)
    config = config_lib.load_file(f'{ROOT / "configs" / "custom.py"}:kinds=image:image+question:text')
    config.data.manual_dir, config.data.data_dir = str(tmp_path / 'vqa'), str(tmp_path / 'tfds')
    config.data.table, config.data.label = 'questions.csv', 'answer'
    config.mesh.data = 1
    config.train.num_steps = 300
    results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    info = input_pipeline.get_dataset_info(config.data)
    assert info.modalities['question'].kind == 'text' and info.num_classes == len(
        set(answers[i] for i in keep)
    )
    # Question-only reaches about 0.68 on easy-VQA, image-only 0.37: above both, image and text are used.
    assert results['test']['accuracy'] > 0.75, results
