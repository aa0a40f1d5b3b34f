"""Writes the tiny Hugging Face towers of tests/test_towers.py and transformers' outputs on fixed raw inputs.

    pip install -c constraints.txt -e '.[towers-test]'   # torch (CPU) and transformers
    python tools/make_tower_fixtures.py [--out tests/fixtures/towers] [--big_vision REPO]

For each of ViT, BERT, SigLIP and CLIP: a randomly initialized transformers model of a tiny size with its
tokenizer (built here from a small vocabulary), saved with `save_pretrained`, and a hand-written
`preprocessor_config.json` (transformers' image processors need torchvision; the script rescales and normalizes
the images itself, as the processor's documented rescale-then-normalize does). `expected.npz` holds the raw
images, the token ids the checkpoint's tokenizer gives, and `last_hidden_state` / `pooler_output` of
`ViTModel`, `BertModel`, `SiglipVisionModel`, `SiglipTextModel`, `CLIPVisionModel` and `CLIPTextModel`
(the vision and text models of the two-tower files) on them. The same seed gives the same files.

With `--big_vision REPO` (a checkout of github.com/google-research/big_vision, which is not on PyPI), it also
writes tiny big_vision ViTs in big_vision's `.npz` layout (per-block and stacked for `scan=True`; `gap`, `tok`
and `map` pooling) and the `encoded` / `head_input` outputs of big_vision's own `models/vit.py` on the same
images, under big_vision/.
"""

import argparse
import io
import json
import os

import numpy as np

TEXTS = ['A photo of a cat.', 'two dogs, playing in the snow!', 'hello']
IMAGE_SIZE, PATCH = 16, 4
SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
WORDS = 'a photo of cat two dogs playing in the snow hello'.split()


def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def pixel_values(raw: np.ndarray, mean, std):
    import torch

    x = raw.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def write_preprocessor(path: str, mean, std) -> None:
    config = dict(
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        size={'height': IMAGE_SIZE, 'width': IMAGE_SIZE},
        do_resize=True,
    )
    with open(os.path.join(path, 'preprocessor_config.json'), 'w') as f:
        json.dump(config, f, indent=2)


def bert_tokenizer():
    from transformers import BertTokenizer

    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *WORDS, '.', ',', '!', '##s']
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=12)


def clip_tokenizer():
    from transformers import CLIPTokenizer

    letters = 'abcdefghijklmnopqrstuvwxyz.,!'
    vocab = ['<|startoftext|>', '<|endoftext|>', *letters, *(c + '</w>' for c in letters)]
    merges = ['c a', 'ca t</w>', 'o g', 'd og', 'dog s</w>', 'h e', 'he l', 'hel l', 'hell o</w>']
    for m in merges:
        vocab.append(m.replace(' ', ''))
    return CLIPTokenizer(
        vocab={w: i for i, w in enumerate(vocab)},
        merges=[tuple(m.split()) for m in merges],
        model_max_length=12,
    )


def siglip_tokenizer(path: str):
    import sentencepiece
    from transformers import SiglipTokenizer

    model = io.BytesIO()
    corpus = [' '.join(WORDS)] * 4 + ['a photo of two cats', 'dogs in the snow', 'hello there photo']
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=40,
        model_type='bpe',
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
        normalization_rule_name='identity',  # no NFKC table: a file of a few KB
    )
    spiece = os.path.join(path, 'spiece.model')
    with open(spiece, 'wb') as f:
        f.write(model.getvalue())
    return SiglipTokenizer(vocab_file=spiece, model_max_length=10)


def make(out: str) -> dict[str, np.ndarray]:
    """Writes the four tower directories under `out`; returns the expected arrays."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    raw = images()
    expected = {'images': raw}
    os.makedirs(out, exist_ok=True)

    def run_text(name, part, tokenizer, model, padding):
        enc = tokenizer(TEXTS, padding=padding, truncation=True, return_tensors='pt')
        with torch.no_grad():
            o = model(**enc)
        expected[f'{name}/{part}/input_ids'] = enc['input_ids'].numpy().astype(np.int32)
        expected[f'{name}/{part}/last_hidden_state'] = o.last_hidden_state.numpy()
        expected[f'{name}/{part}/pooler_output'] = o.pooler_output.numpy()

    def run_image(name, model, mean, std):
        with torch.no_grad():
            o = model(pixel_values=pixel_values(raw, mean, std))
        expected[f'{name}/vision/last_hidden_state'] = o.last_hidden_state.numpy()
        expected[f'{name}/vision/pooler_output'] = o.pooler_output.numpy()

    vision = dict(SMALL, image_size=IMAGE_SIZE, patch_size=PATCH)
    half = [0.5, 0.5, 0.5]

    path = os.path.join(out, 'vit')
    model = tf.ViTModel(tf.ViTConfig(**vision)).eval()
    model.save_pretrained(path)
    write_preprocessor(path, half, half)
    run_image('vit', model, half, half)

    path = os.path.join(out, 'bert')
    tokenizer = bert_tokenizer()
    model = tf.BertModel(
        tf.BertConfig(**SMALL, vocab_size=len(tokenizer), max_position_embeddings=16, type_vocab_size=2)
    ).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    run_text('bert', 'text', tokenizer, model, True)

    path = os.path.join(out, 'siglip')
    os.makedirs(path, exist_ok=True)
    tokenizer = siglip_tokenizer(path)
    text = dict(SMALL, vocab_size=tokenizer.vocab_size, max_position_embeddings=10, projection_size=12)
    text.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_preprocessor(path, half, half)
    run_image('siglip', model.vision_model, half, half)
    run_text('siglip', 'text', tokenizer, model.text_model, 'max_length')

    path = os.path.join(out, 'clip')
    tokenizer = clip_tokenizer()
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    text = dict(SMALL, vocab_size=len(tokenizer), max_position_embeddings=12)
    text.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=0)
    model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_preprocessor(path, mean, std)
    run_image('clip', model.vision_model, mean, std)
    run_text('clip', 'text', tokenizer, model.text_model, True)
    return expected


# big_vision ViTs: (file, vit.Model fields, the subtree its parameters are written under)
BIG_VISION = {
    'gap': (dict(pool_type='gap'), 'params/'),
    'tok': (dict(pool_type='tok'), 'params/img/'),
    'map_scan': (dict(pool_type='map', scan=True), 'params/'),
}


def import_big_vision(repo: str):
    """big_vision's `models/vit.py` from a checkout at `repo` (github.com/google-research/big_vision; not on
    PyPI). Its `big_vision.utils` needs TensorFlow and is used only for loading checkpoints: an empty module
    stands in for it."""
    import importlib
    import sys
    import types

    sys.path.insert(0, os.path.abspath(repo))
    utils = sys.modules.setdefault('big_vision.utils', types.ModuleType('big_vision.utils'))
    importlib.import_module('big_vision').utils = utils
    return importlib.import_module('big_vision.models.vit')


def make_big_vision(out: str, repo: str) -> dict[str, np.ndarray]:
    """Writes big_vision-layout .npz files of tiny ViTs (per-block and stacked; gap, tok and map pooling) under
    `out`/big_vision with random parameters; returns big_vision's `encoded` and `head_input` on `images()`."""
    import importlib

    import jax

    vit = import_big_vision(repo)
    raw = images()
    x = raw.astype(np.float32) / 127.5 - 1  # big_vision's value_range(-1, 1)
    os.makedirs(os.path.join(out, 'big_vision'), exist_ok=True)
    expected = {}

    def moved(params, seed):  # every parameter moved off its initialization (cls starts at 0)
        rng = np.random.default_rng(seed)
        leaves, tree = jax.tree.flatten(jax.tree.map(np.asarray, params))
        return jax.tree.unflatten(tree, [a + rng.normal(0, 0.1, a.shape).astype(np.float32) for a in leaves])

    def write(name, params, prefix):
        flat = {
            prefix + '/'.join(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
        }
        np.savez(os.path.join(out, 'big_vision', f'{name}.npz'), **flat)

    for i, (name, (fields, prefix)) in enumerate(BIG_VISION.items()):
        model = vit.Model(
            None, width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(PATCH, PATCH), **fields
        )
        params = moved(model.init(jax.random.key(i), x)['params'], i)
        _, outputs = model.apply({'params': params}, x)
        write(name, params, prefix)
        expected[f'{name}/encoded'] = np.asarray(outputs['encoded'])
        expected[f'{name}/head_input'] = np.asarray(outputs['head_input'])
    text = importlib.import_module('big_vision.models.proj.image_text.text_transformer')
    ids = np.random.default_rng(5).integers(0, 30, (3, 8)).astype(np.int32)
    expected['text/ids'] = ids
    for i, (name, scan) in enumerate((('text', False), ('text_scan', True))):
        model = text.Model(8, width=16, depth=2, mlp_dim=32, num_heads=2, vocab_size=30, scan=scan)
        params = moved(model.init(jax.random.key(10 + i), ids)['params'], 10 + i)
        _, outputs = model.apply({'params': params}, ids)
        write(name, params, 'params/txt/')
        expected[f'{name}/encoded'] = np.asarray(outputs['transformed'])
        expected[f'{name}/head_input'] = np.asarray(outputs['pre_logits'])
    return expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=os.path.join('tests', 'fixtures', 'towers'))
    parser.add_argument('--big_vision', help='a checkout of big_vision: also write its ViT fixtures')
    args = parser.parse_args()
    expected = make(args.out)
    np.savez_compressed(os.path.join(args.out, 'expected.npz'), **expected)
    print(f'Wrote {args.out}: {len(expected)} expected arrays.')
    if args.big_vision:
        expected = make_big_vision(args.out, args.big_vision)
        np.savez_compressed(os.path.join(args.out, 'big_vision', 'expected.npz'), **expected)
        print(f'Wrote {args.out}/big_vision: {len(expected)} expected arrays.')


if __name__ == '__main__':
    main()
