"""Tests of refnet_jax/data/tokenizers.py: ids as each tokenizer library itself gives them, padding that is not
id 0, and a trained tokenizer that is the same file byte for byte."""

import hashlib

import numpy as np
import pytest
import sentencepiece
import tokenizers as hf
from tokenizers import models, normalizers, pre_tokenizers, processors

from refnet_jax.data import tokenizers

TEXTS = [
    'Hello worlds, a good day!',
    'good',
    '',
    'An unseen word: xylophone, and ÜNÏCODE café',
    'day ' * 12,
]


def wordpiece_file(path, padding: bool = True) -> str:
    """A BERT-style WordPiece tokenizer.json: lower-casing, [CLS] text [SEP], [PAD] = id 3 (not 0)."""
    vocab = ['[UNK]', '[CLS]', '[SEP]', '[PAD]', 'hello', 'world', '##s', 'good', 'day', ',', '!', 'a', ':']
    tokenizer = hf.Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token='[UNK]'))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]', special_tokens=[('[CLS]', 1), ('[SEP]', 2)]
    )
    tokenizer.add_special_tokens(['[UNK]', '[CLS]', '[SEP]', '[PAD]'])
    if padding:
        tokenizer.enable_padding(pad_id=3, pad_token='[PAD]')
    tokenizer.save(str(path))
    return str(path)


def sentencepiece_file(path, pad: bool) -> str:
    """A sentencepiece BPE model trained here; with `pad`, padding is id 3."""
    ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3 if pad else -1)
    corpus = [
        f'the {w} jumps over {v} dog number {i}' for i in range(50) for w, v in (('fox', 'a'), ('cat', 'the'))
    ]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(path.with_suffix('')),
        vocab_size=60,
        model_type='bpe',
        num_threads=1,
        minloglevel=2,
        **ids,
    )
    return str(path)


def library_batch(ids: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: each list cut to `length` and right-padded with `pad_id`, and its mask."""
    out = np.full((len(ids), length), pad_id)
    mask = np.zeros((len(ids), length), bool)
    for i, row in enumerate(ids):
        out[i, : len(row[:length])] = row[:length]
        mask[i, : len(row[:length])] = True
    return out, mask


def test_tokenizer_json_ids_are_the_librarys(tmp_path):
    path = wordpiece_file(tmp_path / 'tokenizer.json')
    tokenizer = tokenizers.load(path)
    assert isinstance(tokenizer, tokenizers.HuggingFace)
    assert tokenizer.pad_id == 3 and tokenizer.vocab_size == 13
    # The library itself, the file as it is (its own padding: to the longest of the batch, with [PAD] = 3).
    reference = hf.Tokenizer.from_file(path).encode_batch(TEXTS)
    assert reference[0].ids[:6] == [1, 4, 5, 6, 9, 11]  # [CLS] hello world ##s , a: lower-cased, word pieces
    ids, mask = tokenizer.encode(TEXTS, max_tokens=len(reference[0].ids))
    np.testing.assert_array_equal(ids, [e.ids for e in reference])
    np.testing.assert_array_equal(mask, [e.attention_mask for e in reference])
    assert (ids[~mask] == 3).all() and (ids[mask] != 3).all() and (~mask).any()
    # Truncated as the library truncates (special tokens kept), padded to max_tokens.
    library = hf.Tokenizer.from_file(path)
    library.enable_truncation(5)
    library.enable_padding(length=5, pad_id=3, pad_token='[PAD]')
    ids, mask = tokenizer.encode(TEXTS, max_tokens=5)
    np.testing.assert_array_equal(ids, [e.ids for e in library.encode_batch(TEXTS)])
    np.testing.assert_array_equal(mask, [e.attention_mask for e in library.encode_batch(TEXTS)])
    assert ids[0, -1] == 2  # [SEP] kept
    assert tokenizer.lengths(TEXTS).tolist() == [
        len(hf.Tokenizer.from_file(path).encode(t).ids) for t in TEXTS
    ]


def test_tokenizer_json_without_padding_section_pads_with_its_pad_token_or_a_new_id(tmp_path):
    path = wordpiece_file(tmp_path / 'tokenizer.json', padding=False)
    tokenizer = tokenizers.load(path)
    assert (tokenizer.pad_id, tokenizer.vocab_size) == (3, 13)  # its special [PAD] token
    library = hf.Tokenizer.from_file(path)
    library.enable_truncation(8)  # the library's truncation keeps [SEP]
    ids, mask = tokenizer.encode(TEXTS, 8)
    np.testing.assert_array_equal(ids, library_batch([e.ids for e in library.encode_batch(TEXTS)], 8, 3)[0])
    # A vocabulary without any padding token: padding gets one more id, which no text encodes to.
    model = hf.Tokenizer(models.WordLevel({'[UNK]': 0, 'good': 1, 'day': 2}, unk_token='[UNK]'))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.save(str(tmp_path / 'plain.json'))
    plain = tokenizers.load(tmp_path / 'plain.json')
    assert (plain.pad_id, plain.vocab_size) == (3, 4)
    ids, mask = plain.encode(['good day', 'day'], 3)
    assert ids.tolist() == [[1, 2, 3], [2, 3, 3]] and mask.tolist() == [[1, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize('pad', [True, False])
def test_sentencepiece_ids_are_the_librarys(tmp_path, pad):
    path = sentencepiece_file(tmp_path / 'sp.model', pad)
    tokenizer = tokenizers.load(path)
    assert isinstance(tokenizer, tokenizers.SentencePiece)
    library = sentencepiece.SentencePieceProcessor(model_file=path)
    texts = ['the fox jumps over a dog', 'the cat number 7', '', 'qqq unseen']
    expected = library.encode(texts)
    pad_id = 3 if pad else library.get_piece_size()
    assert tokenizer.pad_id == pad_id and tokenizer.vocab_size == library.get_piece_size() + (0 if pad else 1)
    for length in (4, 30):
        ids, mask = tokenizer.encode(texts, length)
        ref_ids, ref_mask = library_batch(expected, length, pad_id)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(mask, ref_mask)
    assert tokenizer.lengths(texts).tolist() == [len(x) for x in expected]
    assert all(0 <= i < tokenizer.vocab_size for row in expected for i in row)


def test_training_twice_gives_the_same_bytes():
    texts = [
        f'review {i}: the product was {"great" if i % 3 else "awful"}, shipping took {i % 7} days'
        for i in range(200)
    ]
    a, b = tokenizers.train(texts, 8000), tokenizers.train(list(texts), 8000)
    assert a.data == b.data and a.sha256 == hashlib.sha256(b.data).hexdigest()
    # Fewer pieces than asked where the text has fewer; padding is id 0 and unknown pieces id 1.
    assert a.vocab_size < 8000 and (a.pad_id, a._processor.unk_id()) == (0, 1)
    # It reads back from its bytes as the same model, ids as sentencepiece gives them.
    again = tokenizers.from_bytes(a.data, '.model')
    library = sentencepiece.SentencePieceProcessor(model_proto=a.data)
    ids, mask = again.encode(texts[:3], 40)
    np.testing.assert_array_equal(ids, library_batch(library.encode(texts[:3]), 40, 0)[0])
    other = tokenizers.train(texts[:100], 8000)
    assert other.data != a.data
    small = tokenizers.train(texts, 40)
    assert small.vocab_size <= 40


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='config.data.tokenizer.a: no file'):
        tokenizers.load(tmp_path / 'missing.json', where='config.data.tokenizer.a')
    (tmp_path / 'broken.json').write_text('{"version": "1.0", "model": 3')
    with pytest.raises(ValueError, match=r'broken.json cannot be read as a Hugging Face tokenizer.json'):
        tokenizers.load(tmp_path / 'broken.json')
    (tmp_path / 'broken.model').write_bytes(b'not a model')
    with pytest.raises(ValueError, match=r'broken.model cannot be read as a sentencepiece .model'):
        tokenizers.load(tmp_path / 'broken.model')
    (tmp_path / 'vocab.txt').write_text('a\nb\n')
    with pytest.raises(
        ValueError, match=r'expected a Hugging Face tokenizer.json \(.json\) or a sentencepiece'
    ):
        tokenizers.load(tmp_path / 'vocab.txt')
    with pytest.raises(ValueError, match='the training text is empty'):
        tokenizers.train(['', '  '], 100)
