"""`Program`: the scheduler's work outside the train step, as one compiled program on JAX.

Under JAX every `keras.ops` call made outside a compiled function is
compiled on its own, the first time it sees each shape: the scheduler's
start, epoch-end statistics and freeze ran more than a hundred such tiny
programs, seconds of compilation at the first `fit` of a model. A `Program`
traces its function once (with `jax.jit`) into one program instead.

The function reads and assigns Keras variables as any Keras code does.
Inside the program a `keras.StatelessScope` maps the variables it was given
to the program's inputs; what the function assigns comes back as outputs and
is written to the variables afterwards (`assign` keeps each variable's
layout). TensorFlow and PyTorch run eager operations without compiling
each, so there the function is simply called.

A program's function must read no other variable (it would be baked into
the program as a constant) and change no Python state (it runs at trace
time only); what it returns must be tensors.

Programs given the same `key` share one compiled program (a new model of
the same structure, a second `fit`): the key must then name everything
the traced code depends on besides the variables' shapes and dtypes.
"""

from __future__ import annotations

import functools
import threading

import keras

_calling = threading.local()


class Program:
    """`function(*args)`, reading and assigning `variables`, compiled once on JAX.

    Args:
        function: Takes tensors (`args`), returns a structure of tensors.
        variables: Every Keras variable the function reads or assigns.
        key: A hashable description of what the function computes, for
            sharing its compiled program with other programs of the same
            key; `None` (default) shares nothing.
    """

    def __init__(self, function, variables, key=None):
        self.function = function
        self.variables = list(variables)
        self.key = key
        self._own = None

    def __call__(self, *args):
        if keras.backend.backend() != "jax":
            return self.function(*args)
        if self.key is not None:
            compiled = _shared(self.key)
        else:
            if self._own is None:
                self._own = _jit()
            compiled = self._own
        _calling.program = self
        try:
            outputs, updates = compiled([v.value for v in self.variables], *args)
        finally:
            _calling.program = None
        for variable, value in zip(self.variables, updates):
            if value is not None:
                variable.assign(value)
        return outputs

    def stateless(self, values, *args):
        """`(outputs, updates)`: the function on `values`; `None` for a variable left as it was."""
        scope = keras.StatelessScope(state_mapping=list(zip(self.variables, values)))
        initial = dict(scope.state_mapping)
        with scope:
            outputs = self.function(*args)
        updates = []
        for variable in self.variables:
            value = scope.get_current_value(variable)
            updates.append(None if value is initial[id(variable)] else value)
        return outputs, updates


def _traced(values, *args):
    # Traced once per compiled program (and per argument signature), by the
    # program being called: programs that share a key trace alike.
    return _calling.program.stateless(values, *args)


def _jit():
    import jax

    # A new function object each time: jax.jit keeps one cache per function.
    return jax.jit(functools.partial(_traced))


@functools.lru_cache(maxsize=256)
def _shared(key):
    return _jit()
