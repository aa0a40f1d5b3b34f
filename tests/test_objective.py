"""The objectives: evaluation scores a split with losses.py's task loss over its real examples only."""

import functools

import jax
import numpy as np
import pytest

from configs import easy_vqa
from refnet_jax import losses
from refnet_jax.data import contract
from refnet_jax.train import metrics, objective, trainer

MODALITIES = {
    'image': contract.ModalityInfo(kind='image', shape=(16, 16, 3), dtype=np.uint8, shared=True),
    'question': contract.ModalityInfo(kind='tokens', shape=(6,), dtype=np.int32, vocab_size=11),
}


def toy_info(num_classes, multi_label):
    return contract.DatasetInfo(
        name='toy',
        modalities=MODALITIES,
        num_classes=num_classes,
        multi_label=multi_label,
        class_names=tuple('abcde'[:num_classes]),
        num_examples={'train': 8},
    )


def padded_batch(info, rows, per_row, real, seed):
    """`rows * per_row` questions on `rows` images, the first `real` of them real; the padding rows hold
    class ids out of range, or all-ones multi-hot labels."""
    rs = np.random.RandomState(seed)
    n = rows * per_row
    if info.multi_label:
        label = rs.randint(0, 2, (n, info.num_classes)).astype(np.int32)
    else:
        label = rs.randint(0, info.num_classes, (n,)).astype(np.int32)
    label[real:] = 1 if info.multi_label else -7
    return {
        'image': rs.randint(0, 256, (rows, 16, 16, 3)).astype(np.uint8),
        'image_index': np.repeat(np.arange(rows), per_row).astype(np.int32),
        'question': rs.randint(0, 11, (n, 6)).astype(np.int32),
        'label': label,
        'mask': np.arange(n) < real,
    }


def real_rows(batch):
    """The batch without its padding rows (and without `mask`)."""
    keep = batch['mask']
    return {k: v if k == 'image' else v[keep] for k, v in batch.items() if k != 'mask'}


@pytest.fixture(scope='module')
def two_class_run():
    """A freshly initialized tiny run with a two-class head (whose parameters also fit two-label data)."""
    return trainer.build(easy_vqa.get_config('tiny'), info=toy_info(2, False), devices=jax.devices()[:1])


@pytest.mark.slow(seconds=3)
@pytest.mark.parametrize('multi_label', [False, True])
def test_evaluation_loss_is_the_task_loss_of_losses_py_over_the_real_examples(two_class_run, multi_label):
    run, info = two_class_run, toy_info(2, multi_label)
    evaluate = functools.partial(trainer.evaluate, run.state, info=info, mesh=run.mesh)
    batches = [padded_batch(info, 4, 2, real=5, seed=0), padded_batch(info, 4, 2, real=8, seed=1)]
    compiled = trainer.eval_step._cache_size()
    with jax.set_mesh(run.mesh):
        results = evaluate(batches, objective.Supervised(run.config, multi_label=multi_label))
        # An equal objective is the same static argument: nothing compiles again.
        config = run.config.copy_and_resolve_references()
        assert evaluate(batches, objective.Supervised(config, multi_label=multi_label)) == results
    assert trainer.eval_step._cache_size() == compiled + 1

    # Independently: the model on the real rows alone, losses.py's per-example loss, the plain mean.
    params = jax.device_get(run.state.params)
    logits = jax.jit(  # one compiled program for both batches
        lambda p, rows: [run.model.apply({'params': p}, r, with_refiner=False)[0] for r in rows]
    )(params, [real_rows(b) for b in batches])
    logits = np.concatenate([np.asarray(x) for x in logits])
    labels = np.concatenate([real_rows(b)['label'] for b in batches])
    task_loss = losses.sigmoid_cross_entropy if multi_label else losses.softmax_cross_entropy
    per_example = np.asarray(task_loss(logits, labels), np.float64)
    assert per_example.shape == (13,)
    assert results['num_examples'] == 13
    assert results['loss'] == pytest.approx(per_example.mean(), rel=1e-5)
    logits = logits.astype(np.float64)
    if multi_label:
        f1 = metrics.multilabel_f1(1 / (1 + np.exp(-logits)), labels)
        assert set(results) == {'num_examples', 'loss'} | {f'{k}_f1' for k in f1}
        assert {k: results[f'{k}_f1'] for k in f1} == pytest.approx(f1, abs=1e-12)
    else:
        assert set(results) == {'num_examples', 'loss', 'accuracy', 'auroc'}
        assert results['accuracy'] == pytest.approx(np.mean(logits.argmax(-1) == labels), abs=1e-12)
        auroc = metrics.roc_auc(logits[:, 1] - logits[:, 0], labels)
        assert results['auroc'] == pytest.approx(auroc, abs=1e-6)


@pytest.mark.slow(seconds=3)
def test_pretraining_evaluation_reads_no_label_and_weights_the_refiner_losses():
    info = toy_info(5, False)
    config = easy_vqa.get_config('tiny,variant=pretrain')
    run = trainer.build(config, info=info, pretraining=True, devices=jax.devices()[:1])
    batch = padded_batch(info, 4, 2, real=5, seed=0)
    del batch['label']
    with jax.set_mesh(run.mesh):
        results = trainer.evaluate(run.state, [batch], run.objective, info, run.mesh)
    assert set(results) == {
        'num_examples',
        'loss',
        'fused_spread',
        'refiner_loss/image',
        'refiner_loss/question',
    }

    params = jax.device_get(run.state.params)
    _, aux = jax.jit(lambda p, rows: run.model.apply({'params': p}, rows))(params, real_rows(batch))
    kind = config.loss.refiner_kind
    expected = {
        m: float(np.mean(losses.refiner_loss(aux['reconstructions'][m], aux['targets'][m], kind=kind)))
        for m in ('image', 'question')
    }
    for m, value in expected.items():
        assert results[f'refiner_loss/{m}'] == pytest.approx(value, rel=1e-5)
    weights = config.loss.refiner_weights
    assert results['loss'] == pytest.approx(sum(weights[m] * v for m, v in expected.items()), rel=1e-5)
    assert results['fused_spread'] == pytest.approx(
        metrics.embedding_spread(np.asarray(aux['fused'])), rel=1e-5
    )
    assert results['num_examples'] == 5


@pytest.mark.parametrize('num_classes,multi_label', [(5, False), (2, False), (5, True)])
def test_build_makes_the_objective_of_the_run(num_classes, multi_label):
    config, info = easy_vqa.get_config('tiny'), toy_info(num_classes, multi_label)
    run = trainer.build(config, info=info, devices=jax.devices()[:1], init=False)
    assert run.objective == objective.Supervised(config, multi_label=multi_label)
    assert run.objective.labeled and not run.objective.eval_with_refiner
    config = easy_vqa.get_config('tiny,variant=pretrain')
    run = trainer.build(config, info=info, pretraining=True, devices=jax.devices()[:1], init=False)
    assert run.objective == objective.Pretraining(config)


def test_objectives_are_equal_by_value_and_pretraining_drops_labels():
    config = easy_vqa.get_config('tiny')
    a, b = objective.Supervised(config), objective.Supervised(config.copy_and_resolve_references())
    assert a == b and hash(a) == hash(b) and a != objective.Supervised(config, multi_label=True)
    assert a.inputs({'label': 1, 'question': 2}) == {'label': 1, 'question': 2}
    pretraining = objective.Pretraining(easy_vqa.get_config('tiny,variant=pretrain'))
    assert pretraining.inputs({'label': 1, 'question': 2}) == {'question': 2}
    config = easy_vqa.get_config('tiny,variant=pretrain')
    config.model.refiner.target = 'embedding'
    with pytest.raises(ValueError, match='collapse'):
        objective.Pretraining(config)


def hand_made_inputs(multi_label):
    """Logits, an aux dict and a batch of 8 examples (the last one padding, `question` absent in three),
    made without a model, so that the loss alone is under test."""
    rs = np.random.RandomState(3)
    b, c, d = 8, 5, 6
    logits = rs.randn(b, c).astype(np.float32)
    if multi_label:
        label = (rs.rand(b, c) > 0.5).astype(np.int32)
    else:
        label = rs.randint(0, c, b).astype(np.int32)
    aux = {
        'fused': rs.randn(b, d).astype(np.float32),
        'embeddings': {},
        'present': {'question': np.arange(b) % 3 != 0},
        'reconstructions': {
            'image': rs.randn(b, 4).astype(np.float32),
            'question': rs.randn(b, 3).astype(np.float32),
        },
        'targets': {
            'image': rs.randn(b, 4).astype(np.float32),
            'question': rs.randn(b, 3).astype(np.float32),
        },
        'fusion_stats': {'deq_iterations': np.float32(7.0)},
    }
    return logits, aux, {'label': label, 'mask': np.arange(b) < 7}


def weighted_config(variant):
    config = easy_vqa.get_config(f'tiny,variant={variant}')
    config.loss.refiner_weights = {'image': 0.3, 'question': 0.7}
    if variant == 'refnet':
        config.loss.ms_weight = 0.25
    return config


# The metrics of the hand-written sum that objective.py had before its terms became the table `TERMS`,
# on `hand_made_inputs` (float32 values; the same, bit for bit, jitted or not, on a 2-core CPU).
GOLDEN = {
    'single-label': {
        'loss': 2.3495540618896484,
        'task_loss': 1.4643276929855347,
        'refiner_loss/image': 1.1257582902908325,
        'refiner_loss/question': 0.5849699378013611,
        'ms_loss': 0.552079975605011,
        'accuracy': 0.4285714328289032,
        'fusion/deq_iterations': 7.0,
    },
    'multi-label': {
        'loss': 1.6829570531845093,
        'task_loss': 0.7033087611198425,
        'refiner_loss/image': 0.9124273061752319,
        'refiner_loss/question': 0.6312805414199829,
        'ms_loss': 1.0560946464538574,
        'accuracy': 0.0,
        'fusion/deq_iterations': 7.0,
    },
    'pretraining': {
        'loss': 0.747206449508667,
        'refiner_loss/image': 1.1257582902908325,
        'refiner_loss/question': 0.5849699378013611,
        'fusion/deq_iterations': 7.0,
    },
}


@pytest.mark.parametrize('case', sorted(GOLDEN))
def test_the_loss_is_the_weighted_sum_of_its_terms_as_written_out_before(case):
    """The table of terms gives the same metric names and numbers as the sum once written out by hand:
    the golden values, and exactly the old expression evaluated here, in its order of summation."""
    multi_label = case == 'multi-label'
    if case == 'pretraining':
        config = weighted_config('pretrain')
        obj = objective.Pretraining(config)
    else:
        config = weighted_config('refnet')
        obj = objective.Supervised(config, multi_label=multi_label)
    logits, aux, batch = hand_made_inputs(multi_label)
    loss, got = obj.loss(logits, aux, batch)
    assert set(got) == set(GOLDEN[case])
    assert {k: float(v) for k, v in got.items()} == pytest.approx(GOLDEN[case], rel=1e-6)
    assert float(loss) == float(got['loss'])
    jitted_loss, jitted = jax.jit(obj.loss)(logits, aux, batch)
    assert {k: float(v) for k, v in jitted.items()} == pytest.approx(GOLDEN[case], rel=1e-6)

    # The old expression: (task +) (0 + w_image r_image + w_question r_question) (+ gamma ms).
    mask, present = batch['mask'], aux['present']['question']
    refiner = np.zeros((), np.float32)
    for m, where in (('image', mask), ('question', mask & present)):
        per_example = losses.refiner_loss(aux['reconstructions'][m], aux['targets'][m], where=where)
        refiner = refiner + config.loss.refiner_weights[m] * losses.masked_mean(per_example, where)
    if case == 'pretraining':
        expected = refiner
    else:
        task_loss = losses.sigmoid_cross_entropy if multi_label else losses.softmax_cross_entropy
        task = losses.masked_mean(task_loss(logits, batch['label'], mask), mask)
        ms_cfg = config.loss.ms
        ms = losses.multi_similarity_loss(
            aux['fused'],
            batch['label'],
            alpha=ms_cfg.alpha,
            beta=ms_cfg.beta,
            base=ms_cfg.base,
            epsilon=ms_cfg.epsilon,
            mining=ms_cfg.mining,
            where=mask,
        )
        expected = task + refiner + config.loss.ms_weight * ms
    assert float(loss) == float(expected)


def test_a_term_of_weight_zero_is_neither_computed_nor_logged():
    config = weighted_config('refiner')
    assert config.loss.ms_weight == 0
    logits, aux, batch = hand_made_inputs(False)
    loss, got = objective.Supervised(config).loss(logits, aux, batch)
    got = {k: float(v) for k, v in got.items()}
    assert 'ms_loss' not in got
    assert float(loss) == pytest.approx(
        got['task_loss'] + 0.3 * got['refiner_loss/image'] + 0.7 * got['refiner_loss/question'], rel=1e-6
    )
    # Every name a run logs is derived from its term: `<name>_loss`, `<name>_loss/<m>`.
    assert [t.metric() for t in objective.TERMS] == ['task_loss', 'refiner_loss', 'ms_loss']
    assert objective.REFINER.metric('image') == 'refiner_loss/image'
    assert [t.name for t in objective.Pretraining(weighted_config('pretrain')).terms] == ['refiner']
