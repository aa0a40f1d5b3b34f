r"""Writes two tiny randomly initialized Hugging Face towers, for trying the 'pretrained' encoders where no
checkpoint can be downloaded (the example of docs/how-to/towers-from-hugging-face.md). Needs no torch.

    python tools/make_tiny_towers.py --out towers [--image_size 32]

- `OUT/siglip`: a two-tower SigLIP (`model_type` 'siglip'), its image tower at `--image_size` pixels with
  8-pixel patches, a `preprocessor_config.json` ([-1, 1] pixels, as SigLIP's) and a sentencepiece
  `spiece.model` for its text tower;
- `OUT/bert`: a BERT (`model_type` 'bert') with a WordPiece `tokenizer.json` whose vocabulary holds the
  letters, digits and punctuation (so any English text tokenizes) and a few hundred common words.

Each is what transformers' `save_pretrained` writes: `config.json`, `model.safetensors` (the tensor names and
shapes of `SiglipModel` and `BertModel`) and the tokenizer files, with this library's initializers drawn from
`--seed`. A real checkpoint (`hf:path/to/siglip-base-patch16-224`) is used the same way.
"""

import argparse
import io
import json
import os
import string

from refnet_jax import console
from refnet_jax.models.towers import export

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
WORDS = """a about after all also an and any are as at back be because been before being best big black blue
both but by can case ceramic classic coffee come could cup day did do does dog down each even every few first
for from get give go good great green had has have he her here him his how i if in into is it its item just
know large last like little long look lovely made make man many may me more most mug my new no not now of
off old on one only or other our out over own people photo picture red right said same scarf see shawl she
should show side small so some sturdy take tea than that the their them then there these they thing think
this those through time to two under up us use very warm was way we well were what when where which while
white who will with wool word work would year yellow you your knitted""".split()
SIGLIP_TEXT = [  # the text the sentencepiece model of the SigLIP text tower is trained on
    'a photo of a cat',
    'a red ceramic mug on a table',
    'two dogs playing in the snow',
    'a warm wool scarf, knitted by hand',
    'the quick brown fox jumps over the lazy dog',
    'a picture of a small blue cup of tea',
]


def siglip(out: str, image_size: int, seed: int) -> str:
    """A tiny two-tower SigLIP directory at `out`."""
    path = os.path.join(out, 'siglip')
    vision = dict(
        SMALL,
        model_type='siglip_vision_model',
        image_size=image_size,
        patch_size=8,
        num_channels=3,
        hidden_act='gelu_pytorch_tanh',
        layer_norm_eps=1e-6,
    )
    tokenizer, vocab_size = _spiece()
    text = dict(
        SMALL,
        model_type='siglip_text_model',
        vocab_size=vocab_size,
        max_position_embeddings=16,
        hidden_act='gelu_pytorch_tanh',
        layer_norm_eps=1e-6,
        projection_size=32,
        pad_token_id=1,
        eos_token_id=1,
    )
    config = dict(model_type='siglip', architectures=['SiglipModel'], vision_config=vision, text_config=text)
    export.save_initialized(config, path, seed=seed)
    _write(path, 'spiece.model', tokenizer)
    _json(
        path,
        'tokenizer_config.json',
        dict(
            tokenizer_class='SiglipTokenizer',
            model_max_length=16,
            do_lower_case=True,
            eos_token='</s>',
            pad_token='</s>',
            unk_token='<unk>',
        ),
    )
    _json(
        path,
        'preprocessor_config.json',
        dict(
            image_processor_type='SiglipImageProcessor',
            do_resize=True,
            size={'height': image_size, 'width': image_size},
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ),
    )
    return path


def bert(out: str, seed: int) -> str:
    """A tiny BERT directory at `out`."""
    path = os.path.join(out, 'bert')
    tokenizer = _wordpiece()
    config = dict(
        SMALL,
        model_type='bert',
        architectures=['BertModel'],
        vocab_size=tokenizer.get_vocab_size(),
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_act='gelu',
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    export.save_initialized(config, path, seed=seed)
    tokenizer.save(os.path.join(path, 'tokenizer.json'))
    _json(
        path,
        'tokenizer_config.json',
        dict(
            tokenizer_class='BertTokenizer',
            model_max_length=64,
            do_lower_case=True,
            pad_token='[PAD]',
            unk_token='[UNK]',
            cls_token='[CLS]',
            sep_token='[SEP]',
            mask_token='[MASK]',
        ),
    )
    return path


def _wordpiece():
    """A BERT WordPiece tokenizer (lower case, [CLS] ... [SEP]) over `WORDS`, characters and ##characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    chars = string.ascii_lowercase + string.digits
    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *chars, *string.punctuation]
    vocab += [f'##{c}' for c in chars] + [w for w in WORDS if w not in vocab]
    tokenizer = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token='[UNK]'))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.BertProcessing(('[SEP]', 3), ('[CLS]', 2))
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _spiece() -> tuple[bytes, int]:
    """A sentencepiece model as SigLIP's: '<pad>' 0, '</s>' 1 (its EOS and padding), '<unk>' 2; and its size."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SIGLIP_TEXT),
        model_writer=model,
        vocab_size=64,
        model_type='bpe',
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    return model.getvalue(), processor.get_piece_size()


def _write(path: str, name: str, data: bytes) -> None:
    with open(os.path.join(path, name), 'wb') as f:
        f.write(data)


def _json(path: str, name: str, value: dict) -> None:
    with open(os.path.join(path, name), 'w') as f:
        json.dump(value, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='towers', help='the directory to write siglip/ and bert/ into')
    parser.add_argument('--image_size', type=int, default=32, help="the SigLIP image tower's image size")
    parser.add_argument('--seed', type=int, default=0, help='the seed of the random parameters')
    args = parser.parse_args()
    if args.image_size < 8 or args.image_size % 8:
        parser.error(f'--image_size={args.image_size}: expected a multiple of 8 (the patch size), at least 8')
    written = [siglip(args.out, args.image_size, args.seed), bert(args.out, args.seed + 10)]
    rows = [(f'{path}/', ', '.join(sorted(os.listdir(path)))) for path in written]
    print(f'Wrote two tiny towers.\n{console.aligned(rows)}')


if __name__ == '__main__':
    main()
