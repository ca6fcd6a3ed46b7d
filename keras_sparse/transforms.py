"""Model-level transforms: `sparsify`, `strip` and `sparsity_report`, for any Keras model.

* `sparsify(model)` turns the kernel-bearing layers of a model (Dense,
  EinsumDense, convolutions, Embedding, wherever they sit: a functional
  graph with op layers, a nested model, an attribute of a custom layer,
  MultiHeadAttention, a keras-hub backbone) into their sparse versions,
  weights copied, inference outputs unchanged.
* `strip(model)` turns every sparse layer back into its stock Keras class
  holding the pruned kernel: the result needs only Keras to load and serve.
* `sparsity_report(model)` tabulates how many weights each mask keeps, and
  how much of the model's weight matrices are pruned at all.

None of them modifies the model it is given (except `sparsify(...,
inplace=True)`, as `Model.quantize()` does).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import keras

from keras_sparse import convert
from keras_sparse.host import to_numpy
from keras_sparse.layers import SparseKernelMixin
from keras_sparse.mask import check_bool
from keras_sparse.walk import (
    dense_values,
    display_names,
    matrix_values,
    sparse_layers,
    unpruned_matrices,
    walk,
    weight_matrices,
)

# ------------------------------------------------------------------ helpers


def _check_model(model, caller):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{caller}()` expects a Keras model (Sequential, functional, subclassed, or a "
            f"keras-hub model). Received: model={model!r} of type {type(model).__name__}"
        )


def sync_frozen_masks(model, caller, freeze_epoch=None):
    """Bring every mask's `frozen` flag in step with its stored state (see
    `KernelMask.sync_frozen`), and warn when weights from before a freeze were put back.

    Called where the masks are read (`sparsity_report`, `strip`, `export_model`,
    `shrink`) and at the end of `fit` with a `SparsityScheduler` (which knows the
    epoch of its freeze, `freeze_epoch`): a restore is the user's (or a
    callback's) act, the library sees it only on its next read.
    """
    masks = [mask for layer in sparse_layers(model) if layer.built for mask in layer.masks.values()]
    unfrozen, changed = [], False
    for mask in masks:
        was_frozen = mask.frozen
        if mask.sync_frozen():
            changed = True
            if was_frozen:
                unfrozen.append(mask)
    if changed and isinstance(model, keras.Model):
        # Compiled steps hold a frozen mask's path: trace them again (the train step
        # at once, as `fit` may be running it).
        model.test_function = model.predict_function = None
        if model.train_function is not None:
            model.make_train_function(force=True)
    if not unfrozen:
        return
    if freeze_epoch is not None:
        advice = (
            f"give EarlyStopping `start_from_epoch={freeze_epoch}`, the epoch of the freeze "
            "(from 0), so that it chooses among pruned weights only"
        )
    else:
        advice = (
            "let EarlyStopping choose among epochs after the freeze only, `start_from_epoch=` "
            "the epoch in which it happens (from 0: `int(0.9 * epochs)` for "
            "`end_fraction=0.9`; a schedule that freezes when `fit` ends, such as "
            "`ConstantSparsity`, has none: do not restore best weights with it)"
        )
    names = sorted({mask.layer.name for mask in unfrozen})
    step = int(to_numpy(unfrozen[0].state("step")))
    kept = sum(mask.num_active() for mask in masks)
    sparsity = 1.0 - kept / sum(mask.size for mask in masks)
    warnings.warn(
        f"{caller}: the masks of {len(names)} layer(s) of model '{model.name}' "
        f"({', '.join(names[:5])}{' and more' if len(names) > 5 else ''}) were frozen, but "
        f"their weights now hold a state from before the freeze (the schedule's step {step}): "
        "weights saved earlier were put back with `set_weights` or `assign`, as "
        "`EarlyStopping(restore_best_weights=True)` does at the end of `fit` when its best "
        "epoch came before the freeze. The model now serves those weights, at sparsity "
        f"{sparsity:.4f}, not the pruned model. To keep the pruned model, {advice}; to prune "
        "these weights, fit again with the SparsityScheduler: it resumes their schedule.",
        stacklevel=3,
    )


def _selector(select):
    """`select` as a predicate on layers."""
    if select is None:
        return lambda layer: True
    if isinstance(select, str):
        pattern = _compiled(select, select)
        return lambda layer: pattern.search(layer.name) is not None
    if isinstance(select, type):
        select = [select]
    if isinstance(select, (list, tuple)) and select:
        patterns = [_compiled(p, select) for p in select if isinstance(p, str)]
        classes = tuple(c for c in select if isinstance(c, type))
        if len(patterns) + len(classes) == len(select):
            return lambda layer: (
                isinstance(layer, classes) or any(p.search(layer.name) for p in patterns)
            )
    elif callable(select):
        return lambda layer: bool(select(layer))
    raise TypeError(
        "Received an invalid value for `select`, expected None, a regex string matched "
        "against layer names (or a list of them), layer classes, or a callable "
        f"`predicate(layer) -> bool`. Received: select={select!r}"
    )


def _compiled(pattern, select):
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"Received an invalid value for `select`: {pattern!r} is not a regular expression "
            f"({error}). Received: select={select!r}"
        ) from None


def copy_model(model):
    """A copy of `model`, same classes and weights, not compiled.

    Made through the model's config (as `.keras` saving does), so every
    class is kept, keras-hub's included. A subclassed model needs
    `get_config()` / `from_config()`.
    """
    try:
        config = keras.saving.serialize_keras_object(model)
        config.pop("compile_config", None)
        copy = keras.saving.deserialize_keras_object(config)
    except Exception as error:
        raise ValueError(
            f"Could not copy model '{model.name}' ({type(model).__name__}) through its "
            f"config: {error}. Give the model `get_config()` and `from_config()`, or "
            "convert it in place with `inplace=True`."
        ) from error
    if len(copy.weights) != len(model.weights):
        raise ValueError(
            f"The copy of model '{model.name}' has {len(copy.weights)} weights, the model "
            f"{len(model.weights)}: it does not rebuild from its config as it was. Convert "
            "it in place with `inplace=True` instead (as `Model.quantize()` does)."
        )
    for source, target in zip(model.weights, copy.weights):
        # On the device, value by value (no trip through the host).
        target.assign(keras.ops.copy(source.value))
    return copy


def _why_not(layer):
    """Why `sparsify` cannot convert `layer` (which holds weight matrices)."""
    if getattr(layer, "quantization_mode", None):
        return f"quantized ({layer.quantization_mode})"
    if convert.sparse_class_for(type(layer)) is None:
        return f"{type(layer).__name__} has no sparse version"
    if not layer.built:
        return "not built"
    return None


def _unmasked_why(layer):
    names = ", ".join(v.name.split("/")[-1] for v in unpruned_matrices(layer))
    return f"converted, but its {names} has no mask in {type(layer).__name__}"


# ----------------------------------------------------------------- sparsify


def sparsify(model, select=None, *, inplace=False, **layer_kwargs):
    """A copy of `model` whose kernel-bearing layers prune: `Dense` -> `SparseLinear`, and so on.

    Each selected layer of a class in the coverage table (`Dense`,
    `EinsumDense`, `Conv1D/2D/3D`, `Conv1D/2D/3DTranspose`,
    `DepthwiseConv1D/2D`, `SeparableConv1D/2D`, `Embedding`, or a subclass
    of one, such as keras-hub's `ReversibleEmbedding`) becomes its sparse
    version, wherever it sits in the model: a functional graph (with op
    layers such as `x + y`), a nested model, an attribute of a custom layer
    or of `MultiHeadAttention`, a keras-hub block. It keeps its name,
    configuration, dtype policy, `trainable` flag and weights; its
    thresholds start at `threshold_initializer` (zeros by default), so the
    hard mask keeps every weight and the new model's inference outputs are
    those of `model`. With the default temperature, each mask's is set from
    its kernel's spread (`DEFAULT_RELATIVE_TEMPERATURE / std(kernel)`).

    Layers that hold weight matrices but are left dense are reported: a
    warning names those that could not be converted (a class without a
    sparse version, a quantized layer) and converted layers holding a matrix
    their class does not prune (keras-hub's untied `reverse_embeddings`),
    with their share of the model's parameters, and `sparsity_report()`
    lists every layer with a matrix left dense.

    The copy saves to `.keras` and reloads with `keras.saving.load_model`;
    layers that a parent rebuilds in code on reload (MultiHeadAttention's
    projections, keras-hub blocks, a custom layer's sublayers) are converted
    again by that parent on reload, from a plan saved in its config.

    Args:
        model: A built Keras model: Sequential, functional, subclassed (with
            `get_config()`, or use `inplace=True`) or a keras-hub model.
        select: Which layers to convert. `None` (default): all of them; a
            regex string (or a list of them) searched in each layer's name
            (`re.search`, as `Model.quantize(filters=...)`: anchor it with
            `^...$` for an exact name); layer classes (`keras.layers.Conv2D`,
            or a list of classes and regexes); or a callable
            `predicate(layer) -> bool`.
        inplace: Convert `model` itself instead of a copy (as
            `Model.quantize()` does); compile it again before training.
            Layers that are sparse already (from an earlier call) keep their
            masks and options, so a second call converts the others.
        **layer_kwargs: Pruning arguments for every converted layer, such as
            `structured=False`, `granularity="neuron"`, `temperature=...`,
            `straight_through=True` (see `SparseLinear`). With
            `granularity="head"`, each selected `MultiHeadAttention` (or
            subclass, keras-hub's included) prunes whole heads, as
            `SparseMultiHeadAttention(granularity="head")` does: its output
            projection gets one threshold per head, and the other layers are
            left as they are (`select` may name attention layers only; prune
            the others in a second call, `inplace=True`, with their own
            granularity).

    Returns:
        The converted model (a copy, not compiled, unless `inplace=True`).

    Raises:
        TypeError: `model` is not a Keras model, `select` is of the wrong
            type, or `layer_kwargs` holds an unknown argument.
        ValueError: no convertible layer matched `select` (or every one
            it matched is sparse already), a pruning
            argument is invalid, the model is not built, or
            `granularity="head"` met a selected layer without heads.

    Example:

    ```python
    sparse_model = keras_sparse.sparsify(model, select=[keras.layers.Conv2D, "^fc"])
    sparse_model.compile(...)
    sparse_model.fit(..., callbacks=[keras_sparse.SparsityScheduler(...)])
    served = keras_sparse.strip(sparse_model)
    ```
    """
    _check_model(model, "sparsify")
    check_bool("inplace", inplace)
    predicate = _selector(select)
    if layer_kwargs.get("granularity") == "head":
        return _sparsify_heads(model, select, predicate, inplace, layer_kwargs)
    options = convert.check_options(layer_kwargs).get_config()
    if not model.built:
        raise ValueError(
            f"`sparsify()` needs a built model; model '{model.name}' is not built. Call it "
            "on data or build it with `keras.Input` first."
        )
    target = model if inplace else copy_model(model)
    found = walk(target)
    parents = {id(layer): parent for layer, parent in found}
    layers = [layer for layer, _ in found]
    # Counted before conversion, as `sparsity_report` counts the result.
    total = sum(matrix_values(layer) for layer in layers)
    holders = [layer for layer in layers if weight_matrices(layer)]
    selected = [layer for layer in holders if predicate(layer)]
    # Layers sparse already (an earlier call's) keep their masks and options.
    stock = [layer for layer in selected if not isinstance(layer, SparseKernelMixin)]
    chosen = [layer for layer in stock if _why_not(layer) is None]
    refused = [(layer, _why_not(layer)) for layer in stock if _why_not(layer)]
    if not chosen:
        if selected and not stock:
            raise ValueError(
                f"Every layer select={select!r} matched in model '{model.name}' is sparse "
                f"already: there is nothing to convert ({[layer.name for layer in selected]})."
            )
        names = [layer.name for layer in holders if convert.sparse_class_for(type(layer))]
        raise ValueError(
            f"No convertible layer matched select={select!r} in model '{model.name}' "
            f"(its convertible layers: {names})"
        )
    for layer in chosen:
        # Every refusal before the first change: a failed call converts nothing.
        convert.check_convertible(layer, options)
    for layer in chosen:
        convert.convert_layer(layer, options)
        convert.record_conversion(target, layer, parents, options)
    # A converted layer may hold a matrix beside the kernels its class prunes.
    refused += [(layer, _unmasked_why(layer)) for layer in chosen if unpruned_matrices(layer)]
    if refused:
        _warn_left_dense(target, refused, total)
    if inplace:
        # Compiled functions hold the stock layers' arithmetic.
        target.train_function = target.test_function = target.predict_function = None
    return target


def _sparsify_heads(model, select, predicate, inplace, layer_kwargs):
    """`sparsify(granularity="head")`: each selected attention layer prunes whole heads.

    As in `SparseMultiHeadAttention(granularity="head")`, the output
    projection gets one threshold per head (its kernel's heads axis is the
    mask's unit axis) and the query, key and value projections stay dense:
    `shrink()` removes a dead head's slices from all four.
    """
    options = convert.check_options({**layer_kwargs, "granularity": "neuron"}).get_config()
    if not model.built:
        raise ValueError(
            f"`sparsify()` needs a built model; model '{model.name}' is not built. Call it "
            "on data or build it with `keras.Input` first."
        )
    attention = keras.layers.MultiHeadAttention
    found = walk(model)
    layers = [layer for layer, _ in found]
    if select is not None:
        # Only attention layers have heads; a selected layer outside them is a mistake.
        inside = {
            id(sub) for layer in layers if isinstance(layer, attention) for sub, _ in walk(layer)
        }
        others = [
            layer.name
            for layer in layers
            if weight_matrices(layer) and id(layer) not in inside and predicate(layer)
        ]
        if others:
            raise ValueError(
                "granularity='head' prunes whole heads of MultiHeadAttention layers only, "
                f"but select={select!r} matched layers without heads: {others}. Select the "
                "attention layers (select=keras.layers.MultiHeadAttention), and sparsify "
                "the others in a second call with their own granularity."
            )
    candidates = [layer for layer in layers if isinstance(layer, attention) and predicate(layer)]
    if not candidates:
        names = [layer.name for layer in layers if isinstance(layer, attention)]
        raise ValueError(
            f"granularity='head' found no MultiHeadAttention layer matching select={select!r} "
            f"in model '{model.name}' (its attention layers: {names})."
        )
    target = model if inplace else copy_model(model)
    found = walk(target)
    parents = {id(layer): parent for layer, parent in found}
    chosen = [
        layer
        for layer, _ in found
        if isinstance(layer, attention)
        and predicate(layer)
        and not isinstance(layer._output_dense, SparseKernelMixin)
    ]
    if not chosen:
        raise ValueError(
            f"Every selected attention layer of model '{model.name}' is sparse already: "
            "there is nothing to convert."
        )
    for layer in chosen:
        output = layer._output_dense
        convert.convert_layer(output, options, unit_axes=convert.HEADS_AXES)
        convert.record_conversion(target, output, parents, options, convert.HEADS_AXES)
    if inplace:
        target.train_function = target.test_function = target.predict_function = None
    return target


def _warn_left_dense(model, refused, total):
    """Warn of the `(layer, why)` pairs left dense, each with its share of the model's
    `total` weight-matrix values."""
    total = total or 1
    names = display_names(model, [layer for layer, _ in refused])
    parts = [
        f"'{name}' ({why}; {dense_values(layer) / total:.1%})"
        for name, (layer, why) in zip(names, refused)
    ]
    share = sum(dense_values(layer) for layer, _ in refused)
    warnings.warn(
        f"sparsify() left {len(refused)} selected layer(s) with weight matrices dense, "
        f"{share / total:.1%} of the weight-matrix values of '{model.name}': " + ", ".join(parts),
        stacklevel=3,
    )


# -------------------------------------------------------------------- strip


def strip(model):
    """A copy of `model` where every sparse layer is its stock Keras class again.

    Each `SparseLinear` becomes a `Dense`, each `SparseConv2D` a `Conv2D`,
    and so on (a converted keras-hub `ReversibleEmbedding` becomes a
    `ReversibleEmbedding`), with the same configuration and with each
    kernel equal to the layer's `effective_weight()` (the kernel times the
    hard mask: pruned weights are exactly zero). Thresholds, masks,
    temperatures and penalties are dropped. The model keeps its class. A
    layer with LoRA enabled gets its dense low-rank update merged into the
    kernel, as Keras merges it when saving, so its kernel keeps no zeros
    (with a warning).

    The result holds no keras-sparse class: it saves to `.keras` and loads
    where `keras_sparse` is not installed, and exports like any Keras model.
    Its inference outputs equal the original's (whose inference uses the
    same hard mask), except for layers built with `inference_mask="soft"`,
    which the stripped model serves hard-masked.

    Args:
        model: A Keras model with at least one sparse layer. It is not
            modified.

    Returns:
        A new model (not compiled).

    Raises:
        TypeError: `model` is not a Keras model.
        ValueError: the model has no sparse layer.
    """
    return _strip(model, require_sparse=True)


def _strip(model, require_sparse, caller="strip()"):
    _check_model(model, caller.rstrip("()"))
    if require_sparse and not sparse_layers(model):
        raise ValueError(
            f"Model '{model.name}' has no sparse layer: there is nothing to strip. "
            "(`keras_sparse.sparsify(model)` makes one.)"
        )
    sync_frozen_masks(model, caller)
    # A fresh model from the config with every keras-sparse class replaced by
    # its stock class, then the weights, layer by layer, with the pruned
    # kernels: fresh objects are exactly what Keras itself would load.
    try:
        config = keras.saving.serialize_keras_object(model)
        config.pop("compile_config", None)
        stripped = keras.saving.deserialize_keras_object(convert.stock_config(config))
    except Exception as error:
        raise ValueError(
            f"{caller} rebuilds model '{model.name}' ({type(model).__name__}) from its "
            "config, with stock layers in place of the sparse ones, as `.keras` loading "
            "does: every custom class (model or layer) must be registered "
            "(`@keras.saving.register_keras_serializable()`) and, if its constructor takes "
            f"arguments, have `get_config()`. Rebuilding failed with: {error}"
        ) from error
    sources = [model] + [layer for layer, _ in walk(model)]
    targets = [stripped] + [layer for layer, _ in walk(stripped)]
    if len(sources) != len(targets):
        raise ValueError(
            f"strip(): the rebuilt model has {len(targets)} layers where '{model.name}' has "
            f"{len(sources)}; its layers do not rebuild from their configs as they were."
        )
    for source, target in zip(sources, targets):
        convert.copy_stock_weights(source, target)
    merged = [
        layer.name
        for layer in sources
        if isinstance(layer, SparseKernelMixin) and getattr(layer, "lora_enabled", False)
    ]
    if merged:
        warnings.warn(
            f"strip() merged the dense LoRA update of {len(merged)} layer(s) into their "
            f"kernels, which therefore keep no pruned zeros: {', '.join(merged[:10])}"
            f"{' and more' if len(merged) > 10 else ''}. The stripped model serves the "
            "same outputs, at the dense size. To ship sparse kernels, prune without LoRA.",
            stacklevel=3,
        )
    return stripped


# ---------------------------------------------------------- sparsity_report


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One row of a `SparsityReport`.

    Attributes:
        name: The layer's name (its path in the model when names repeat;
            `layer/kernel` for a layer with several pruned kernels;
            `"total"` for the total row).
        shape: The kernel's shape; `None` in the total row.
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


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """A layer holding weight matrices that no mask prunes (one entry of `SparsityReport.dense`).

    Attributes:
        name: The layer's name (or path).
        class_name: Its class.
        params: Values in its weight matrices.
    """

    name: str
    class_name: str
    params: int


_HEADERS = ("layer", "kernel shape", "active", "total", "density")


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Per-kernel sparsity of a model, and how much of the model the masks cover.

    Attributes:
        rows: One `LayerSparsity` per pruned kernel, in layer order.
        total: The sum over `rows` (`name="total"`, `shape=None`).
        dense: One `DenseLayer` per layer whose weight matrices are not
            pruned (left dense by `sparsify`, or never converted).
        lora: The names of the sparse layers with LoRA enabled: they serve
            their masked kernel plus a dense low-rank update, so the density
            of their rows counts the sparse base alone.

    `str(report)` (so `print(report)`) is an aligned text table followed by
    the coverage; `report.to_markdown()` the same in Markdown.
    """

    rows: tuple
    total: LayerSparsity
    dense: tuple = ()
    lora: tuple = ()

    @property
    def dense_params(self):
        """Values in the weight matrices no mask prunes."""
        return sum(entry.params for entry in self.dense)

    @property
    def coverage(self):
        """Fraction of the model's weight-matrix values that a mask prunes."""
        whole = self.total.total + self.dense_params
        return self.total.total / whole if whole else 0.0

    @property
    def model_density(self):
        """Fraction of all weight-matrix values kept: active pruned weights plus the dense ones."""
        whole = self.total.total + self.dense_params
        return (self.total.active + self.dense_params) / whole if whole else 0.0

    def _cells(self):
        def cells(row):
            shape = "" if row.shape is None else " x ".join(str(d) for d in row.shape)
            return (row.name, shape, str(row.active), str(row.total), f"{row.density:.2%}")

        return [cells(row) for row in self.rows], cells(self.total)

    def _coverage_lines(self):
        whole = self.total.total + self.dense_params
        lines = [
            f"masks cover {self.total.total} of {whole} weight-matrix values "
            f"({self.coverage:.2%}); the model keeps {self.model_density:.2%} of them"
        ]
        if self.dense:
            left = ", ".join(
                f"{d.name} ({d.class_name}, {d.params / whole:.2%})" for d in self.dense[:10]
            )
            more = f" and {len(self.dense) - 10} more" if len(self.dense) > 10 else ""
            lines.append(f"left dense: {left}{more}")
        if self.lora:
            names = ", ".join(self.lora[:10]) + (" and more" if len(self.lora) > 10 else "")
            lines.append(
                f"LoRA enabled: {names}; they serve their kernel plus a dense low-rank update, "
                "so their density counts the sparse base alone (strip() merges the update)"
            )
        return lines

    def __str__(self):
        body, total = self._cells()
        widths = [max(len(r[i]) for r in [_HEADERS, *body, total]) for i in range(len(_HEADERS))]

        def line(cells):
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        table = [line(_HEADERS), rule, *map(line, body), rule, line(total)]
        return "\n".join(table + self._coverage_lines())

    def to_markdown(self):
        body, total = self._cells()
        total = (f"**{total[0]}**", *total[1:])
        lines = ["| " + " | ".join(_HEADERS) + " |", "|:--|:--|--:|--:|--:|"]
        lines += ["| " + " | ".join(r) + " |" for r in [*body, total]]
        return "\n".join(lines + [""] + self._coverage_lines())


def sparsity_report(model):
    """How many weights each mask of `model` keeps, and what is left dense.

    Counts use the hard mask (`|kernel| >= threshold`, pruned weights
    excluded), as inference does.

    Args:
        model: A Keras model (any kind) or layer containing sparse layers,
            at any depth.

    Returns:
        A `SparsityReport`: `.rows` (one `LayerSparsity` per pruned kernel,
        with `name`, `shape`, `active`, `total`, `density`), `.total`,
        `.dense` (layers whose weight matrices no mask prunes),
        `.coverage`, `.model_density`, a text table as `str(report)` and
        `.to_markdown()`.

    Raises:
        TypeError: `model` is not a Keras model or layer.
        ValueError: there is no sparse layer, or one is not built.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "`sparsity_report()` expects a Keras model. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    layers = sparse_layers(model)
    if not layers:
        raise ValueError(f"Model '{model.name}' has no sparse layer to report on.")
    sync_frozen_masks(model, "sparsity_report()")
    names = display_names(model, layers)
    rows = []
    for layer, name in zip(layers, names):
        layer._require_built("sparsity_report")
        masks = layer.masks
        for kernel_name, mask in masks.items():
            label = name if len(masks) == 1 else f"{name}/{kernel_name}"
            rows.append(LayerSparsity(label, mask.shape, mask.num_active(), mask.size))
    total = LayerSparsity("total", None, sum(r.active for r in rows), sum(r.total for r in rows))
    everything = [layer for layer, _ in walk(model)]
    if isinstance(model, keras.Model) is False:
        everything = [model] + everything
    # Quantized kernels are matrices left dense too, as sparsify's warning counts them.
    holders = [layer for layer in everything if unpruned_matrices(layer)]
    dense = tuple(
        DenseLayer(name, type(layer).__name__, dense_values(layer))
        for layer, name in zip(holders, display_names(model, holders))
    )
    lora = tuple(
        name for layer, name in zip(layers, names) if getattr(layer, "lora_enabled", False)
    )
    return SparsityReport(tuple(rows), total, dense, lora)
