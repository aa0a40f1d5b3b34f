"""Tokenization: one small interface over the two tokenizer files that text towers ship.

- a Hugging Face `tokenizer.json`, read with the `tokenizers` package (BERT's WordPiece, GPT-style BPE, ...);
- a sentencepiece `.model`, read with `sentencepiece` (big_vision's SigLIP and T5-style towers).

`load(path)` reads either by its suffix; `train(texts, vocab_size)` trains a sentencepiece model on a
modality's training text, reproducibly: one thread and fixed options, so the same text gives a byte-identical
`.model` file on any machine (the `tokenizers` package's trainers are not deterministic, even with one thread).

A tokenizer turns texts into ids exactly as its library does (normalization, lower-casing, special tokens such
as BERT's [CLS]/[SEP] as the file says), truncates them to `max_tokens` and pads them with the file's padding
id, which need not be 0; the mask (True on real tokens) says what is padding. A file without a padding token
gets one more id, `vocab_size - 1`, that no text encodes to.

The own-data `text` kind tokenizes with this module. The built-in easy-VQA and Hateful Memes builders keep
their word vocabularies (`common.build_vocabulary`): their recorded results depend on those exact ids.
"""

from __future__ import annotations

import abc
import hashlib
import io
import pathlib
import re
from collections.abc import Sequence

import numpy as np

SUFFIXES = ('.json', '.model')
# Options of every trained tokenizer: a BPE sentencepiece model with padding id 0 and unknown-piece id 1, no
# BOS/EOS pieces (a modality's text is one sentence), trained on one thread (reproducible byte for byte).
# (BPE rather than unigram: on small text, unigram's soft size limit ends in near-character pieces.)
TRAIN_OPTIONS = dict(
    model_type='bpe',
    pad_id=0,
    unk_id=1,
    bos_id=-1,
    eos_id=-1,
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    max_sentence_length=1 << 20,
    minloglevel=2,
)
# Names of padding tokens, looked for among a tokenizer.json's special tokens when its `padding` is not set.
PAD_TOKENS = ('[PAD]', '<pad>', '<|pad|>', '<PAD>')


class Tokenizer(abc.ABC):
    """Texts -> token ids and a mask, as the tokenizer file says.

    Attributes:
      data: the tokenizer file's bytes (saved with prepared data; `sha256` identifies it).
      suffix: '.json' (Hugging Face `tokenizers`) or '.model' (sentencepiece).
      vocab_size: ids are in [0, vocab_size): the file's ids, and the added padding id where it has none.
      pad_id: the id of padding positions.
    """

    suffix: str

    def __init__(self, data: bytes, vocab_size: int, pad_id: int):
        self.data, self.vocab_size, self.pad_id = data, vocab_size, pad_id

    @property
    def sha256(self) -> str:
        """The hex SHA-256 of the file's bytes."""
        return hashlib.sha256(self.data).hexdigest()

    @abc.abstractmethod
    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids as the library gives them, untruncated and unpadded."""

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) the number of ids of each text, untruncated."""
        return np.asarray([len(ids) for ids in self.ids(texts)], np.int64)

    def encode(self, texts: Sequence[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (N, max_tokens) int32 of `texts`, truncated and padded to `max_tokens` with `pad_id`, and
        the mask (N, max_tokens) bool, True on real tokens."""
        out = np.full((len(texts), max_tokens), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_tokens), bool)
        for i, ids in enumerate(self.ids(texts)):
            ids = ids[:max_tokens]
            out[i, : len(ids)] = ids
            mask[i, : len(ids)] = True
        return out, mask


class HuggingFace(Tokenizer):
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` package. Its `padding` section (or else a
    special token named as in `PAD_TOKENS`) gives the padding id, and its direction; truncation keeps the
    first `max_tokens` ids (the library's, so that special tokens such as [SEP] are kept)."""

    suffix = '.json'

    def __init__(self, data: bytes):
        import tokenizers

        self._tokenizer = tokenizers.Tokenizer.from_str(data.decode('utf-8'))
        padding = self._tokenizer.padding
        vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._direction = 'right'
        if padding is not None:
            pad_id, self._pad_token = int(padding['pad_id']), padding['pad_token']
            self._direction = padding['direction']
        else:
            special = {
                t.content: i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special
            }
            name = next((name for name in PAD_TOKENS if name in special), None)
            pad_id = special[name] if name is not None else vocab_size
            self._pad_token = name or '[PAD]'
        super().__init__(data, max(vocab_size, pad_id + 1), pad_id)
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def ids(self, texts):
        return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

    def encode(self, texts, max_tokens):
        tokenizer = self._tokenizer
        tokenizer.enable_truncation(max_tokens)
        tokenizer.enable_padding(
            direction=self._direction, pad_id=self.pad_id, pad_token=self._pad_token, length=max_tokens
        )
        try:
            encodings = tokenizer.encode_batch(list(texts))
        finally:
            tokenizer.no_padding()
            tokenizer.no_truncation()
        ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), max_tokens)
        mask = np.asarray([e.attention_mask for e in encodings], bool).reshape(len(texts), max_tokens)
        return ids, mask


class SentencePiece(Tokenizer):
    """A sentencepiece `.model`, run by `sentencepiece` with its default encoding (no BOS/EOS added); its
    `pad_id` (or, where it has none, one more id) pads."""

    suffix = '.model'

    def __init__(self, data: bytes):
        import sentencepiece

        self._processor = sentencepiece.SentencePieceProcessor(model_proto=data)
        size = self._processor.get_piece_size()
        pad_id = self._processor.pad_id()
        super().__init__(data, size if pad_id >= 0 else size + 1, pad_id if pad_id >= 0 else size)

    def ids(self, texts):
        return self._processor.encode(list(texts))


KINDS: dict[str, type[Tokenizer]] = {cls.suffix: cls for cls in (HuggingFace, SentencePiece)}


def from_bytes(data: bytes, suffix: str, *, where: str = 'tokenizer') -> Tokenizer:
    """The tokenizer of a file's bytes, by its `suffix` ('.json' or '.model').

    Raises:
      ValueError: naming `where`, for another suffix or bytes that the library cannot read.
    """
    if suffix not in KINDS:
        raise ValueError(
            f'{where}: expected a Hugging Face tokenizer.json (.json) or a sentencepiece .model file, '
            f'not a {suffix or "suffix-less"} file'
        )
    try:
        return KINDS[suffix](data)
    except Exception as e:  # each library raises its own error types for a file it cannot parse
        library = 'a Hugging Face tokenizer.json' if suffix == '.json' else 'a sentencepiece .model'
        raise ValueError(
            f'{where} cannot be read as {library}: {str(e).strip() or type(e).__name__}'
        ) from None


def load(path: str | pathlib.Path, *, where: str | None = None) -> Tokenizer:
    """The tokenizer in the file `path` (`tokenizer.json` or `.model`).

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is of another kind, or does not parse; the message names `where` (default: the path).
    """
    path = pathlib.Path(path)
    where = where or str(path)
    if not path.is_file():
        raise FileNotFoundError(f'{where}: no file {path}')
    return from_bytes(path.read_bytes(), path.suffix, where=where)


def train(texts: Sequence[str], vocab_size: int, *, where: str = 'tokenizer') -> SentencePiece:
    """A sentencepiece BPE model trained on `texts` with `vocab_size` pieces, or as many as the text has when
    that is fewer (`TRAIN_OPTIONS`): the same texts and size give the same bytes.

    Raises:
      ValueError: naming `where`, when the texts hold no character or `vocab_size` is too small for them.
    """
    sentences = [t.replace('\n', ' ') for t in texts if t.strip()]
    if not sentences:
        raise ValueError(f'{where}: the training text is empty; expected some text to train a tokenizer on')
    try:
        return SentencePiece(_train(sentences, vocab_size))
    except RuntimeError as e:
        error = e
    # Fewer pieces than asked for: the text allows no more (sentencepiece says how many it does).
    largest = re.search(r'Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)', str(error))
    if largest is not None and int(largest[1]) < vocab_size:
        try:
            return SentencePiece(_train(sentences, int(largest[1])))
        except RuntimeError as e:
            error = e
    raise ValueError(
        f'{where}: sentencepiece cannot train a tokenizer of vocab_size={vocab_size} on this text '
        f'({str(error).split("] ")[-1]})'
    )


def _train(sentences: list[str], vocab_size: int) -> bytes:
    """The bytes of a sentencepiece model of `vocab_size` pieces trained on `sentences` (`TRAIN_OPTIONS`)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, **TRAIN_OPTIONS
    )
    return model.getvalue()
