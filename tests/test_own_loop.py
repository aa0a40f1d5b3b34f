"""docs/how-to/own-training-loop.md: ReFNet's pieces in a model and training loop of the user's own, run as
written: the loss falls, and the refiner's parameters get gradients and change."""

import jax
import numpy as np
import pytest
from helpers import doc_blocks


@pytest.mark.slow(seconds=5)
def test_the_own_training_loop_example_trains_the_refiner():
    (lang, code), *rest = doc_blocks('how-to/own-training-loop.md')
    assert lang == 'python' and not rest
    namespace = {'__name__': 'own_training_loop'}
    exec(compile(code, 'docs/how-to/own-training-loop.md', 'exec'), namespace)  # as a user would run it

    history = namespace['history']
    assert len(history) == 200 and np.isfinite(history).all()
    assert history[-1] < 0.5 * history[0], (history[0], history[-1])

    # Adam moves a parameter only where its gradient was ever non-zero: every refiner parameter moved, so every
    # one received gradients (from the refiner loss alone: nothing else reads the decoders).
    model, params = namespace['model'], namespace['params']
    assert set(params) >= {'fusion', 'refiner'} and set(params['refiner']) == {'a', 'b'}
    initial = model.init(jax.random.key(0), namespace['a'], namespace['b'])['params']['refiner']
    moved = jax.tree.map(
        lambda x, y: bool((np.asarray(x) != np.asarray(y)).all()), initial, params['refiner']
    )
    assert all(jax.tree.leaves(moved)), moved
