"""Token NLL against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np

from montessori_jax.core.losses import batch_token_nll, token_nll


def test_token_nll_hand_computed():
    # vocab 3; logits at positions 0..2 of two sequences (position 3's logits are unused)
    logits = jnp.array([
        [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, 9.0, 9.0]],
        [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [9.0, 9.0, 9.0]],
    ])
    tokens = jnp.array([[7, 1, 0, 1], [7, 2, 1, 0]])  # token 0 of each row is never a target
    mask = jnp.array([[False, True, True, False], [False, True, False, True]])
    s, c = token_nll(logits, tokens, mask)
    # row 0: target 1 after uniform logits -> log 3; target 0 after [2,0,0] -> log(e^2+2) - 2
    row0 = math.log(3) + (math.log(math.exp(2) + 2) - 2)
    # row 1: target 2 after [1,2,3] -> log(e+e^2+e^3) - 3; target 0 after [5,5,5] -> log 3
    row1 = (math.log(math.e + math.e**2 + math.e**3) - 3) + math.log(3)
    np.testing.assert_allclose(np.asarray(s), [row0, row1], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(c), [2, 2])
    total, count = batch_token_nll(logits, tokens, mask)
    assert float(count) == 4
    assert abs(float(total) - (row0 + row1)) < 1e-5
