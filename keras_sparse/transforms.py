"""Model-level transforms: `sparsify`, `strip` and `sparsity_report`.

* `sparsify(model)` turns the `keras.layers.Dense` layers of a Sequential or
  functional model into `SparseLinear` layers holding the same weights.
* `strip(model)` turns every `SparseLinear` back into a plain `Dense` whose
  kernel is the pruned kernel (`effective_weight()`): the result needs only
  Keras to load and serve.
* `sparsity_report(model)` tabulates how many weights each `SparseLinear`
  keeps.

None of them modifies the model it is given.
"""

from __future__ import annotations

import dataclasses
import math
import re

import keras
import numpy as np
from keras import ops

from keras_sparse.callbacks import sparse_layers, walk_layers
from keras_sparse.layer import DEFAULT_RELATIVE_TEMPERATURE, SparseLinear

# `SparseLinear` keyword arguments that `sparsify` sets from the Dense layer
# and that `**layer_kwargs` may therefore not override.
_COPIED_FROM_DENSE = ("units", "use_bias", "name")


# ------------------------------------------------------------------ helpers


def _check_model(model, caller):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{caller}()` expects a Keras model (`keras.Sequential` or a "
            f"functional `keras.Model`). Received: model={model!r} of type "
            f"{type(model).__name__}"
        )
    if isinstance(model, keras.Sequential):
        return
    try:  # Functional is not public API; fall back to clone_model's own check.
        from keras.src.models.functional import Functional
    except ImportError:  # pragma: no cover
        return
    if not isinstance(model, Functional):
        raise ValueError(
            f"`{caller}()` supports `keras.Sequential` and functional "
            "`keras.Model` instances, whose layers can be rebuilt one by one; "
            f"received a subclassed model of type {type(model).__name__}. "
            "Build the same network as a functional model first."
        )


def _selector(select):
    if select is None:
        return lambda layer: True
    if isinstance(select, str):
        pattern = re.compile(select)
        return lambda layer: pattern.search(layer.name) is not None
    if isinstance(select, (list, tuple)) and all(isinstance(p, str) for p in select):
        patterns = [re.compile(p) for p in select]
        return lambda layer: any(p.search(layer.name) for p in patterns)
    if callable(select):
        return lambda layer: bool(select(layer))
    raise TypeError(
        "Received an invalid value for `select`, expected None, a regex "
        "string (or a list of them) matched against layer names, or a "
        f"callable `predicate(layer) -> bool`. Received: select={select!r}"
    )


def _dense_arguments(layer):
    """The constructor arguments shared by `Dense` and `SparseLinear`, from `layer`.

    Serialized, so that the new layer shares no initializer, regularizer or
    constraint object with the old one.
    """
    return {
        "units": layer.units,
        "activation": keras.activations.serialize(layer.activation),
        "use_bias": layer.use_bias,
        "kernel_initializer": keras.initializers.serialize(layer.kernel_initializer),
        "bias_initializer": keras.initializers.serialize(layer.bias_initializer),
        "kernel_regularizer": keras.regularizers.serialize(layer.kernel_regularizer),
        "bias_regularizer": keras.regularizers.serialize(layer.bias_regularizer),
        "activity_regularizer": keras.regularizers.serialize(layer.activity_regularizer),
        "kernel_constraint": keras.constraints.serialize(layer.kernel_constraint),
        "bias_constraint": keras.constraints.serialize(layer.bias_constraint),
        "name": layer.name,
        "dtype": layer.dtype_policy,
        "trainable": layer.trainable,
    }


def _clone(model, replace):
    """`clone_model` with `replace(layer) -> new layer or None` and weights copied.

    Layers for which `replace` returns None are cloned from their config and
    get the original's weights; replaced layers are returned as
    `(old, new)` pairs for the caller to fill.
    """
    replaced, cloned = [], []

    def clone_function(layer):
        new = replace(layer)
        if new is None:
            new = layer.__class__.from_config(layer.get_config())
            cloned.append((layer, new))
        else:
            replaced.append((layer, new))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new in cloned:
        if old.weights and new.weights:
            new.set_weights(old.get_weights())
    return new_model, replaced


def _to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


# ----------------------------------------------------------------- sparsify


def sparsify(model, select=None, **layer_kwargs):
    """A copy of `model` whose `Dense` layers are `SparseLinear` layers.

    Each selected `keras.layers.Dense` (exactly that class: subclasses may
    change `call()` and are left alone) becomes a `SparseLinear` with the
    same name, units, activation, bias, initializers, regularizers,
    constraints, dtype policy and `trainable` flag, holding the Dense
    layer's kernel and bias (a LoRA-enabled Dense gives its merged kernel).
    The thresholds start at the `threshold_initializer` (zeros by default),
    so the hard mask keeps every weight and the new model's inference
    outputs are those of `model`. Other layers are cloned with their
    weights. The temperature, when left to its default, is set from the
    copied kernel's spread (`DEFAULT_RELATIVE_TEMPERATURE / std(kernel)`).

    Args:
        model: A `keras.Sequential` or functional `keras.Model`. It is not
            modified. Nested Sequential/functional models are searched too.
        select: Which Dense layers to convert. `None` (default): all of
            them; a regex string (or a list of them) searched in each
            layer's name (`re.search`, as `Model.quantize(filters=...)`:
            anchor it with `^...$` for an exact name); or a callable
            `predicate(layer) -> bool`.
        **layer_kwargs: Extra `SparseLinear` arguments for every converted
            layer, such as `structured=False`, `temperature=...`,
            `straight_through=True`. `units`, `use_bias` and `name` come
            from the Dense layer and cannot be given.

    Returns:
        A new model (not compiled, except that a compiled Sequential model's
        compile config is carried over, as `keras.models.clone_model` does).

    Raises:
        TypeError: `model` is not a Keras model, or `select` is of the
            wrong type.
        ValueError: no Dense layer matched `select`, `layer_kwargs` names
            an argument copied from the Dense layer, or the model is
            subclassed or quantized.

    Example:

    ```python
    sparse_model = keras_sparse.sparsify(model, select="^hidden")
    sparse_model.compile(...)
    sparse_model.fit(..., callbacks=[keras_sparse.SparsityScheduler(...)])
    served = keras_sparse.strip(sparse_model)
    ```
    """
    _check_model(model, "sparsify")
    predicate = _selector(select)
    clash = sorted(set(layer_kwargs) & set(_COPIED_FROM_DENSE))
    if clash:
        raise ValueError(
            f"`sparsify()` copies {clash} from each Dense layer; they cannot be "
            f"passed in `layer_kwargs`. Received: {', '.join(f'{k}=...' for k in clash)}"
        )
    # Fail on bad layer arguments now, with SparseLinear's own message.
    SparseLinear(1, **layer_kwargs)

    matched = [
        layer
        for layer in walk_layers(model)
        if type(layer) is keras.layers.Dense and predicate(layer)
    ]
    if not matched:
        names = [layer.name for layer in walk_layers(model) if type(layer) is keras.layers.Dense]
        raise ValueError(
            f"no Dense layer matched select={select!r} in model '{model.name}' "
            f"(its Dense layers: {names})"
        )
    for layer in matched:
        if getattr(layer, "quantization_mode", None):
            raise ValueError(
                f"Dense layer '{layer.name}' is quantized "
                f"({layer.quantization_mode!r}); sparsify the float model, "
                "then strip and quantize it."
            )
    matched_ids = {id(layer) for layer in matched}

    def replace(layer):
        if id(layer) not in matched_ids:
            return None
        return SparseLinear(**{**_dense_arguments(layer), **layer_kwargs})

    new_model, replaced = _clone(model, replace)
    for old, new in replaced:
        if not old.built:
            continue
        if not new.built:
            new.build((None, int(old.kernel.shape[0])))
        kernel = _to_numpy(old.kernel).astype("float32")
        new.kernel.assign(kernel)
        if old.use_bias:
            new.bias.assign(_to_numpy(old.bias).astype("float32"))
        if new.initial_temperature is None:
            std = float(np.std(kernel))
            if math.isfinite(std) and std > 0:
                new.temperature = DEFAULT_RELATIVE_TEMPERATURE / std
    return new_model


# -------------------------------------------------------------------- strip


def strip(model):
    """A copy of `model` where every `SparseLinear` is a plain `keras.layers.Dense`.

    Each `SparseLinear` becomes a `Dense` with the same name, units,
    activation, bias, initializers, kernel/bias regularizers and
    constraints, dtype policy and `trainable` flag, whose kernel is the
    layer's `effective_weight()` (the kernel times the hard mask: pruned
    weights are exactly zero) and whose bias is the layer's bias. The
    thresholds, masks, temperature and sparsity penalty are dropped. Other
    layers are cloned with their weights.

    The result holds only built-in Keras layers: it saves to `.keras` and
    loads where `keras_sparse` is not installed, and exports like any Keras
    model. Its inference outputs equal the original's (whose inference uses
    the same hard mask), except for layers built with
    `inference_mask="soft"`, which the stripped model serves hard-masked.

    Args:
        model: A `keras.Sequential` or functional `keras.Model` with at
            least one `SparseLinear` layer. It is not modified.

    Returns:
        A new model (compile state as in `keras.models.clone_model`).

    Raises:
        TypeError: `model` is not a Keras model.
        ValueError: the model has no `SparseLinear` layer, or is subclassed.
    """
    return _strip(model, require_sparse=True)


def _strip(model, require_sparse):
    _check_model(model, "strip")
    if require_sparse and not sparse_layers(model):
        raise ValueError(
            f"Model '{model.name}' has no SparseLinear layer: there is nothing "
            "to strip. (`keras_sparse.sparsify(model)` makes one from Dense layers.)"
        )

    def replace(layer):
        if not isinstance(layer, SparseLinear):
            return None
        return keras.layers.Dense(**_dense_arguments(layer))

    new_model, replaced = _clone(model, replace)
    for old, new in replaced:
        if not old.built:
            continue
        if not new.built:
            new.build((None, old.in_features))
        # `kernel * mask` gives -0.0 for pruned negative weights; `+ 0.0`
        # makes every pruned weight +0.0, so all zeros have the same bytes.
        weights = [_to_numpy(old.effective_weight()) + np.float32(0.0)]
        if old.use_bias:
            weights.append(_to_numpy(old.bias))
        new.set_weights(weights)
    return new_model


# ---------------------------------------------------------- sparsity_report


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One row of a `SparsityReport`.

    Attributes:
        name: The layer's name (`"total"` for the total row).
        shape: The kernel's shape `(in_features, units)`; `None` in the
            total row.
        active: Weights kept by the hard mask (`num_active()`).
        total: Weights in the kernel.
    """

    name: str
    shape: tuple | None
    active: int
    total: int

    @property
    def density(self):
        """`active / total` (0.0 for an empty kernel)."""
        return self.active / self.total if self.total else 0.0

    @property
    def sparsity(self):
        """`1 - density`."""
        return 1.0 - self.density

    def as_dict(self):
        return {
            "name": self.name,
            "shape": self.shape,
            "active": self.active,
            "total": self.total,
            "density": self.density,
        }


_HEADERS = ("layer", "kernel shape", "active", "total", "density")


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Per-layer sparsity of a model's `SparseLinear` layers.

    Attributes:
        rows: One `LayerSparsity` per `SparseLinear`, in build order.
        total: The sum over `rows` (`name="total"`, `shape=None`).

    `str(report)` (so `print(report)`) is an aligned text table;
    `report.to_markdown()` the same as a Markdown table.
    """

    rows: tuple
    total: LayerSparsity

    def _cells(self):
        def cells(row):
            shape = "" if row.shape is None else " x ".join(str(d) for d in row.shape)
            return (row.name, shape, str(row.active), str(row.total), f"{row.density:.2%}")

        return [cells(row) for row in self.rows], cells(self.total)

    def __str__(self):
        body, total = self._cells()
        widths = [max(len(r[i]) for r in [_HEADERS, *body, total]) for i in range(len(_HEADERS))]

        def line(cells):
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(_HEADERS), rule, *map(line, body), rule, line(total)])

    def to_markdown(self):
        body, total = self._cells()
        total = (f"**{total[0]}**", *total[1:])
        lines = ["| " + " | ".join(_HEADERS) + " |", "|:--|:--|--:|--:|--:|"]
        lines += ["| " + " | ".join(r) + " |" for r in [*body, total]]
        return "\n".join(lines)


def sparsity_report(model):
    """How many weights each `SparseLinear` of `model` keeps.

    Counts use the hard mask (`|kernel| >= threshold`, pruned weights
    excluded), as inference does.

    Args:
        model: A Keras model (any kind) or layer containing `SparseLinear`
            layers, nested models included.

    Returns:
        A `SparsityReport`: `.rows` (one `LayerSparsity` per layer, with
        `name`, `shape`, `active`, `total`, `density`), `.total`, a text
        table as `str(report)` and `.to_markdown()`.

    Raises:
        TypeError: `model` is not a Keras model or layer.
        ValueError: there is no `SparseLinear` layer, or one is not built.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "`sparsity_report()` expects a Keras model. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    layers = sparse_layers(model)
    if not layers:
        raise ValueError(f"Model '{model.name}' has no SparseLinear layer to report on.")
    rows = []
    for layer in layers:
        layer._require_built("sparsity_report")
        shape = tuple(int(d) for d in layer.kernel.shape)
        rows.append(LayerSparsity(layer.name, shape, layer.num_active(), math.prod(shape)))
    total = LayerSparsity("total", None, sum(r.active for r in rows), sum(r.total for r in rows))
    return SparsityReport(tuple(rows), total)
