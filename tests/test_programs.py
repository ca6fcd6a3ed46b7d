"""`Program`: Keras code that reads and assigns variables, as one compiled program on JAX."""

import keras
import numpy as np
from backend_utils import to_numpy
from conftest import BACKEND
from keras import ops

from keras_sparse.programs import Program


def variables(seed):
    rng = np.random.default_rng(seed)
    a = keras.Variable(rng.normal(size=(2, 3)).astype("float32"), name="a")
    b = keras.Variable(np.zeros(3, "float32"), name="b")
    c = keras.Variable(np.float32(rng.normal()), name="c")
    return a, b, c


def program(a, b, c, key=None, traces=None):
    def function(scale):
        if traces is not None:
            traces.append(1)
        b.assign(ops.sum(a, axis=0) * scale)
        return ops.max(a) + c

    return Program(function, [a, b, c], key=key)


def test_a_program_writes_what_it_assigns_and_leaves_the_rest():
    a, b, c = variables(0)
    a0, c0 = to_numpy(a), to_numpy(c)
    out = program(a, b, c)(np.float32(2.0))
    np.testing.assert_allclose(to_numpy(out), a0.max() + c0, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(b), a0.sum(axis=0) * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(to_numpy(a), a0)
    np.testing.assert_array_equal(to_numpy(c), c0)


def test_programs_of_one_key_each_read_their_own_variables_now():
    key = ("test_programs", "shared")
    traces = []
    first, second = variables(1), variables(2)
    p1 = program(*first, key=key, traces=traces)
    p2 = program(*second, key=key, traces=traces)
    for p, (a, b, c) in ((p1, first), (p2, second)):
        out = p(np.float32(3.0))
        np.testing.assert_allclose(to_numpy(out), to_numpy(a).max() + to_numpy(c), rtol=1e-6)
        np.testing.assert_allclose(to_numpy(b), to_numpy(a).sum(axis=0) * 3.0, rtol=1e-6)
    # Values written since are read, not the ones the program was traced with.
    a, b, c = first
    a.assign(np.full((2, 3), 5.0, "float32"))
    out = p1(np.float32(1.0))
    np.testing.assert_allclose(to_numpy(out), 5.0 + to_numpy(c), rtol=1e-6)
    np.testing.assert_allclose(to_numpy(b), np.full(3, 10.0), rtol=1e-6)
    # JAX traces the function once for the key; elsewhere it runs at every call.
    assert len(traces) == (1 if BACKEND == "jax" else 3)
