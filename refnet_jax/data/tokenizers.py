"""Tokenization: one small interface over the tokenizer files that text towers ship.

- a Hugging Face `tokenizer.json`, read with the `tokenizers` package (BERT's WordPiece, GPT-style BPE, ...);
- a sentencepiece `.model`, read with `sentencepiece` (big_vision's SigLIP and T5-style towers);
- a Hugging Face model directory, `'hf:DIR'` (`Pretrained`): the tokenizer file there with the settings of its
  `tokenizer_config.json` and `config.json`, so that a text is tokenized exactly as the tower's own processor
  tokenizes it (BERT, CLIP and SigLIP text towers; `load_tower` uses the same class).

`load(path)` reads any of them (a file by its suffix); `train(texts, vocab_size)` trains a sentencepiece model on a
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
import json
import pathlib
import re
import string
from collections.abc import Sequence
from typing import Any

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
    # The end-of-text id, where the tokenizer ends every text with one (None otherwise). Where it is also the
    # padding id (CLIP, SigLIP), the first padding id of a row is that EOS, a real token.
    eos_id: int | None = None
    # The most ids a text may have (the tower's positions), and whether every text is padded to exactly that
    # many (a tower that pools its last position, SigLIP's): None and False for a plain tokenizer file.
    max_length: int | None = None
    pad_to_max: bool = False

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
        return _pad(self.ids(texts), max_tokens, self.pad_id)


class HuggingFace(Tokenizer):
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` package. Its `padding` section (or else a
    special token named as in `PAD_TOKENS`) gives the padding id, and its direction; truncation keeps the
    first `max_tokens` ids (the library's, so that special tokens such as [SEP] are kept)."""

    suffix = '.json'

    def __init__(self, data: bytes, pad_token: str | None = None):
        """`pad_token`: the padding token (a tokenizer_config.json's), instead of the file's own."""
        import tokenizers

        self._tokenizer = tokenizers.Tokenizer.from_str(data.decode('utf-8'))
        padding = self._tokenizer.padding
        vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._direction = 'right'
        if pad_token is not None:
            pad_id, self._pad_token = self._tokenizer.token_to_id(pad_token), pad_token
            if pad_id is None:
                raise ValueError(f'the tokenizer has no pad_token {pad_token!r}')
        elif padding is not None:
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
PRETRAINED = 'hf:'  # the prefix of a Hugging Face model directory


class Pretrained(Tokenizer):
    """The tokenizer of a Hugging Face model directory (`'hf:DIR'`), as the tower's own processor tokenizes:

    - BERT, CLIP (and another `tokenizer.json`): the file run by `tokenizers` (its normalization and special
      tokens, truncation keeping them), padded with tokenizer_config.json's `pad_token` (CLIP's is its EOS);
    - SigLIP (`spiece.model`): SiglipTokenizer's canonicalization (lower case, punctuation removed, whitespace
      collapsed), an EOS after at most `max_length - 1` pieces, and padding to `max_length`: its text tower pools
      the last position, as it was trained (`pad_to_max`).

    `max_length` is tokenizer_config.json's `model_max_length`, at most config.json's `max_position_embeddings`
    (or `max_positions`). `data` and `suffix` are the tokenizer file's; `sha256` covers it and the two configs.
    """

    def __init__(
        self, path: str | pathlib.Path, *, where: str | None = None, max_positions: int | None = None
    ):
        path = pathlib.Path(path)
        where = where or f'{PRETRAINED}{path}'
        if not path.is_dir():
            raise ValueError(f'{where}: there is no directory {str(path)!r}')
        model = read_json(path / 'config.json', where)
        settings = read_json(path / 'tokenizer_config.json', where)
        self.family = str(model.get('model_type', ''))
        section = model.get('text_config', model)
        positions = [n for n in (section.get('max_position_embeddings'), max_positions) if n]
        self.max_length = int(min([settings.get('model_max_length', 1 << 30), *positions]))
        file = path / _pretrained_file(self.family)
        if not file.is_file():
            raise ValueError(
                f'{where}: the directory has no tokenizer file {file.name}; expected tokenizer.json (BERT, CLIP) '
                'or spiece.model (SigLIP) beside config.json'
            )
        data = file.read_bytes()
        self.suffix = file.suffix
        if self.suffix == '.model':
            self._tokenizer = SentencePiece(data)
            self._tokenizer.pad_id = self._piece(settings.get('pad_token'), '</s>', where)
            self.eos_id = self._piece(settings.get('eos_token'), '</s>', where)
            self._lower = settings.get('do_lower_case', True)
            self.pad_to_max = True
            vocab_size = self._tokenizer._processor.get_piece_size()  # its padding is a piece (the EOS)
        else:
            default = '<|endoftext|>' if self.family.startswith('clip') else '[PAD]'
            try:
                self._tokenizer = HuggingFace(data, _token(settings.get('pad_token')) or default)
            except ValueError as e:
                raise ValueError(f'{where}: {e}') from None
            eos = _token(settings.get('eos_token'))
            self.eos_id = self._tokenizer._tokenizer.token_to_id(eos) if eos else None
            vocab_size = self._tokenizer.vocab_size
        super().__init__(data, vocab_size, self._tokenizer.pad_id)
        configs = (path / name for name in ('config.json', 'tokenizer_config.json'))
        self._digest = hashlib.sha256(
            data + b''.join(f.read_bytes() for f in configs if f.is_file())
        ).hexdigest()

    def _piece(self, token: Any, default: str, where: str) -> int:
        name = _token(token) or default
        i = self._tokenizer._processor.piece_to_id(name)
        if self._tokenizer._processor.id_to_piece(i) != name:
            raise ValueError(f'{where}: the tokenizer has no token {name!r}')
        return i

    @property
    def sha256(self) -> str:
        return self._digest

    def _canonical(self, text: str) -> str:
        """SiglipTokenizer's canonicalization: lower case, punctuation removed, whitespace collapsed."""
        text = text.lower() if self._lower else text
        return re.sub(r'\s+', ' ', text.translate(_NO_PUNCTUATION)).strip()

    def ids(self, texts):
        if self.suffix == '.json':
            return self._tokenizer.ids(texts)
        return [ids + [self.eos_id] for ids in self._tokenizer.ids([self._canonical(t) for t in texts])]

    def encode(self, texts, max_tokens):
        if self.suffix == '.json':
            return self._tokenizer.encode(texts, max_tokens)
        pieces = self._tokenizer.ids([self._canonical(t) for t in texts])
        return _pad([ids[: max_tokens - 1] + [self.eos_id] for ids in pieces], max_tokens, self.pad_id)


_NO_PUNCTUATION = str.maketrans('', '', string.punctuation)


def _pad(rows: list[list[int]], max_tokens: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N, max_tokens) int32, mask (N, max_tokens) bool) of `rows`, truncated and padded."""
    out = np.full((len(rows), max_tokens), pad_id, np.int32)
    mask = np.zeros((len(rows), max_tokens), bool)
    for i, ids in enumerate(rows):
        ids = ids[:max_tokens]
        out[i, : len(ids)] = ids
        mask[i, : len(ids)] = True
    return out, mask


def _token(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken's {'content': ...}."""
    return value.get('content') if isinstance(value, dict) else value


def _pretrained_file(model_type: str) -> str:
    """The tokenizer file of a Hugging Face model directory whose config.json has `model_type`: SigLIP's
    sentencepiece file (read as SiglipTokenizer reads it), any other tower's tokenizer.json."""
    return 'spiece.model' if model_type.startswith('siglip') else 'tokenizer.json'


def read_json(path: pathlib.Path, where: str) -> dict:
    """The JSON object in `path`, {} where there is no such file."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f'{where}: {path.name} is not JSON ({e})') from None
    if not isinstance(value, dict):
        raise ValueError(f'{where}: {path.name} holds a {type(value).__name__}; expected a JSON object')
    return value


def library(source: str) -> str:
    """The library that tokenizes for `source` ('train', a file, or 'hf:DIR'): 'tokenizers' or 'sentencepiece'."""
    if source.startswith(PRETRAINED):
        model = read_json(pathlib.Path(source[len(PRETRAINED) :]) / 'config.json', source)
        source = _pretrained_file(str(model.get('model_type', '')))
    return 'tokenizers' if source.endswith('.json') else 'sentencepiece'


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
    """The tokenizer in the file `path` (`tokenizer.json` or `.model`), or of the Hugging Face model directory
    'hf:DIR' (`Pretrained`).

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is of another kind, or does not parse; the message names `where` (default: the path).
    """
    if str(path).startswith(PRETRAINED):
        return Pretrained(str(path)[len(PRETRAINED) :], where=where)
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
