"""Turning stock layers into sparse ones in place, and back, so that any model can be pruned.

`convert_layer(layer)` turns a built stock layer (a `Dense`, a `Conv2D`, a
keras-hub `ReversibleEmbedding`...) into its sparse class in place: the
object stays where it is (a node of a functional graph, an attribute of a
custom layer, an element of a list), keeps its weights, and gains its masks. `stock_config` and
`copy_stock_weights` give `strip()` the stock twin, with the pruned kernel.

The `.keras` format needs one more thing. A functional model or a
Sequential saves each of its layers' class and config, so a converted layer
reloads as its sparse class. But a layer that builds its sublayers in code
(`MultiHeadAttention`'s projections, a keras-hub `TransformerEncoder`'s
feed-forward, a custom layer's `self.dense = Dense(...)`, a keras-hub
backbone's whole graph) rebuilds them as stock layers on reload. For those,
the nearest ancestor whose config is saved (the *owner*) records which
sublayers were converted, with which arguments; on reload the owner converts
them again right after it is built, before the weights are loaded. This is
the route Keras's `quantize()` takes to carry a mode into rebuilt sublayers
(through the dtype policy), done with a small plan instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect

import keras
from keras import ops

from keras_sparse.layers import SPARSE_CLASSES, MaskedKernel, SparseKernelMixin, lora_factors
from keras_sparse.mask import OPTION_NAMES, MaskOptions
from keras_sparse.walk import walk

# The name a converted subclass of a stock layer, and an owner, are saved under.
_SAVED_NAME = "keras_sparse>Converted"


# ------------------------------------------------------------- classes


def _stock_base(cls):
    """The stock class in `SPARSE_CLASSES` that `cls` is or extends, or `None`."""
    for base in cls.__mro__:
        if base in SPARSE_CLASSES:
            return base
    return None


# Kernels that known subclasses of stock layers add, by the subclass's name:
# keras-hub's `ReversibleEmbedding` holds a language model's output
# projection, `(hidden, vocabulary)`, unless its weights are tied (then the
# reverse pass reads the masked `embeddings`).
_SUBCLASS_KERNELS = {
    "ReversibleEmbedding": {
        "reverse_embeddings": MaskedKernel(
            (1,),
            0,
            "embeddings_initializer",
            prefix="reverse_",
            present=lambda layer: not getattr(layer, "tie_weights", True),
        )
    },
}


def _masked_kernels_of(cls):
    kernels = dict(SPARSE_CLASSES[_stock_base(cls)].masked_kernels)
    for base in cls.__mro__:
        kernels.update(_SUBCLASS_KERNELS.get(base.__name__, {}))
    return kernels


@functools.cache
def _sparse_subclass(cls):
    """A sparse version of a subclass of a stock layer (keras-hub's `ReversibleEmbedding`...)."""
    sparse = type(
        "Sparse" + cls.__name__,
        (SparseKernelMixin, cls),
        {
            "masked_kernels": _masked_kernels_of(cls),
            "__module__": __name__,
            "get_config": _subclass_get_config,
        },
    )
    _register_saved_name(sparse)
    return sparse


def sparse_class_for(cls):
    """The sparse class of layer class `cls`, or `None` when it has none (or is sparse already)."""
    if issubclass(cls, SparseKernelMixin):
        return None
    if cls in SPARSE_CLASSES:
        return SPARSE_CLASSES[cls]
    if _stock_base(cls) is None:
        return None
    return _sparse_subclass(cls)


def _register_saved_name(cls):
    # Saved under the one name `Converted.from_config` answers to, which
    # rebuilds the class from the stock class it names (a class made at run
    # time cannot be registered under its own name before a file is loaded).
    from keras.src.saving import object_registration

    object_registration.GLOBAL_CUSTOM_NAMES[cls] = _SAVED_NAME


def _identity(cls):
    return {
        "module": cls.__module__,
        "class_name": cls.__name__,
        "registered_name": keras.saving.get_registered_name(cls),
    }


def _subclass_get_config(self):
    base = type(self).__mro__[2]  # (sparse class, mixin, base, ...)
    return {
        "kind": "layer",
        "base": {**_identity(base), "config": base.get_config(self)},
        "sparse": self.mask_options.get_config(),
    }


def _class_of(identity):
    """The class an identity names: a registered class (a subclass of a stock layer from
    another package is one: a model holding an unregistered class cannot be saved), or one
    of Keras's own (`keras.layers.ReversibleEmbedding`, found in its module)."""
    cls = keras.saving.get_registered_object(identity["registered_name"])
    module = identity.get("module") or ""
    if cls is None and module.split(".")[0] == "keras":
        cls = getattr(importlib.import_module(module), identity["class_name"], None)
    if cls is None:
        raise ValueError(
            f"The saved model uses the layer class {identity['registered_name']!r}, which is "
            "not registered: import the package that defines it before loading."
        )
    return cls


@keras.saving.register_keras_serializable(package="keras_sparse", name="Converted")
class Converted:
    """How a file restores a converted subclass of a stock layer, and an owner with a plan.

    Only its `from_config` is used: it returns the restored layer, never an
    instance of this class.
    """

    def get_config(self):  # pragma: no cover -- required by the registry, never called
        return {}

    @classmethod
    def from_config(cls, config):
        base = config["base"]
        if config["kind"] == "layer":
            sparse = sparse_class_for(_class_of(base))
            return sparse.from_config({**base["config"], **config["sparse"]})
        owner = keras.saving.deserialize_keras_object(base)
        _become_owner(owner)
        owner._sparse_plan = [dict(entry) for entry in config["converted"]]
        if owner.built:
            owner._apply_sparse_plan()
        return owner


# ------------------------------------------------------ in-place conversion


def _refresh_call_signature(layer):
    """What `Layer.__init__` derives from `call`'s signature, for the layer's new class."""
    signature = inspect.signature(layer.call)
    layer._call_signature = signature
    layer.call_signature_parameters = [p.name for p in signature.parameters.values()]
    layer._call_has_training_arg = "training" in layer.call_signature_parameters
    layer._call_has_mask_arg = "mask" in layer.call_signature_parameters
    layer._call_has_context_arg = {
        arg: (arg in layer.call_signature_parameters) for arg in layer._call_context_args
    }


def _parent_scope(layer):
    path = getattr(layer, "path", None) or layer.name
    return path.rsplit("/", 1)[0] if "/" in path else ""


def check_options(options):
    """`options` (a dict of pruning arguments) validated, or the layer's own error."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"Unknown pruning arguments {unknown}: expected some of {list(OPTION_NAMES)}. "
            f"Received: {', '.join(f'{k}={options[k]!r}' for k in unknown)}"
        )
    return MaskOptions.check(**options)


# The unit axes of an attention output projection whose units are heads: its kernel is
# (heads, head_dim, output_dim).
HEADS_AXES = (0,)


def convert_layer(layer, options=None, unit_axes=None, restoring=False):
    """Turn the built stock layer `layer` into its sparse class, in place; returns it.

    The kernel keeps its values, and thresholds start at
    `threshold_initializer` (zeros: the hard mask keeps every weight, so the
    layer's inference outputs are unchanged). With the default temperature,
    it is set from the kernel's spread (`10 / std(kernel)`).

    Args:
        layer: A built instance of a class in `SPARSE_CLASSES` or a
            subclass of one.
        options: Pruning arguments, as `SparseLinear` takes them.
        unit_axes: For an `EinsumDense`, the kernel axes whose entries are
            the mask's units, instead of those its equation names as outputs
            (`HEADS_AXES`: an attention output projection's heads).
        restoring: Whether a load is restoring a layer that was pruned
            before it was quantized: a quantized layer is then taken (its
            masks start frozen; a load then sets them from the file), where
            pruning one is refused.
    """
    cls, options = check_convertible(layer, options, restoring)
    tracker_was_locked = layer._tracker.locked
    layer._tracker.unlock()
    stock_dict = dict(layer.__dict__)
    try:
        if unit_axes is not None:
            object.__setattr__(layer, "_sparse_unit_axes", tuple(unit_axes))
        layer.__class__ = cls
        # Keras wraps `build` and `quantize` per instance around the old
        # class's methods; the built layer needs neither wrapper.
        for name in ("build", "quantize"):
            layer.__dict__.pop(name, None)
        object.__setattr__(layer, "mask_options", options)
        object.__setattr__(layer, "_kernel_masks", {})
        for name in cls.masked_kernels:
            if name in layer.__dict__:  # a plain attribute in the stock class
                layer.__dict__["_" + name] = layer.__dict__.pop(name)
        _refresh_call_signature(layer)
        with contextlib.ExitStack() as scopes:
            # The masks' variable paths continue the kernel's (`parent/layer/threshold`).
            for name in filter(None, _parent_scope(layer).split("/")):
                scopes.enter_context(keras.name_scope(name))
            layer._build_masks()
    except BaseException:
        layer.__class__ = _stock_class_of(cls)
        layer.__dict__.clear()
        layer.__dict__.update(stock_dict)
        raise
    finally:
        if tracker_was_locked:
            layer._tracker.lock()
    for mask in layer._kernel_masks.values():
        # A stock kernel autocasts to the compute dtype inside `call` (a mixed
        # policy's float16); a sparse layer's is read in float32, where its mask is
        # computed, and only the masked kernel is cast (`SparseKernelMixin.add_weight`).
        mask.kernel._autocast = False
    return layer


def check_convertible(layer, options=None, restoring=False):
    """`(sparse class, checked options)` for `layer`, or the error `convert_layer(layer,
    options, restoring=restoring)` would raise, before it changes anything."""
    if isinstance(layer, SparseKernelMixin):
        raise ValueError(f"Layer '{layer.name}' ({type(layer).__name__}) is sparse already.")
    cls = sparse_class_for(type(layer))
    if cls is None:
        raise ValueError(f"Layer '{layer.name}' ({type(layer).__name__}) has no sparse version.")
    if not layer.built:
        raise ValueError(
            f"Layer '{layer.name}' is not built: build the model (call it on data, or "
            "start it with keras.Input) before converting it."
        )
    if getattr(layer, "quantization_mode", None) and not restoring:
        raise ValueError(
            f"Layer '{layer.name}' is quantized ({layer.quantization_mode!r}): prune the "
            "float model, then quantize it."
        )
    options = check_options(dict(options or {}))
    if options.granularity == "n:m" and not cls._n_m_supported():
        try:
            MaskOptions.check(n_m_supported=False, **options.get_config())
        except ValueError as error:
            raise ValueError(f"Layer '{layer.name}' ({type(layer).__name__}): {error}") from None
    return cls, options


def _stock_class_of(cls):
    mro = cls.__mro__
    return mro[mro.index(SparseKernelMixin) + 1]


@functools.cache
def _stock_identity(cls):
    """How Keras names the stock class `cls` in a saved config."""
    from keras.src.saving import serialization_lib

    probe = serialization_lib.serialize_with_public_class(cls)
    return {key: probe[key] for key in ("module", "class_name", "registered_name")}


def stock_config(config):
    """A serialized model config with every keras-sparse class replaced by its stock class.

    Sparse layers lose their pruning arguments, owners their plans, a
    `SparseMultiHeadAttention` becomes a `MultiHeadAttention`.
    """
    if isinstance(config, list):
        return [stock_config(item) for item in config]
    if not isinstance(config, dict):
        return config
    name = config.get("registered_name") or ""
    if name == _SAVED_NAME:
        inner = config["config"]
        base = inner["base"]
        replaced = {**config, **base, "config": stock_config(base["config"])}
        if inner["kind"] == "layer":
            replaced["config"] = _without_options(replaced["config"])
        return replaced
    if name.startswith("keras_sparse>") and "config" in config:
        cls = keras.saving.get_registered_object(name)
        stock = _stock_class_of(cls) if issubclass(cls, SparseKernelMixin) else cls.__mro__[1]
        return {
            **config,
            **_stock_identity(stock),
            "config": _without_options(stock_config(config["config"])),
        }
    return {key: stock_config(value) for key, value in config.items()}


def _without_options(config):
    # A LoRA update is merged into the stripped kernel (as Keras merges it on saving).
    dropped = set(OPTION_NAMES) | {"lora_rank", "lora_alpha"}
    return {key: value for key, value in config.items() if key not in dropped}


def copy_stock_weights(source, target):
    """Copy `source`'s own weights into its stock twin `target`, kernels as pruned."""
    own = source._trainable_variables + source._non_trainable_variables
    kernels = {}
    if isinstance(source, SparseKernelMixin):
        dropped = {id(v) for mask in source.masks.values() for v in mask.variables}
        # A quantized layer's kernel holds the pruned weights already (quantize()
        # hard-prunes first) and is copied as it is.
        for mask in [] if source.quantization_mode else source.masks.values():
            # `kernel * mask` gives -0.0 for pruned negative weights; `+ 0.0`
            # makes every pruned weight +0.0, so all zeros have the same bytes.
            kernel = ops.add(mask.effective_weight(), 0.0)
            factors = lora_factors(source, mask.kernel_name)
            if factors:  # merged, as Keras merges a LoRA update when it saves a layer
                dropped |= {id(v) for v in factors}
                scale = source.lora_alpha / source.lora_rank
                kernel = kernel + scale * ops.matmul(factors[0].value, factors[1].value)
            kernels[id(mask.kernel)] = kernel
        own = [v for v in own if id(v) not in dropped]
    destination = target._trainable_variables + target._non_trainable_variables
    if len(own) != len(destination):
        raise ValueError(
            f"strip(): layer '{source.name}' has {len(own)} weights to copy but its stock "
            f"twin '{target.name}' ({type(target).__name__}) has {len(destination)}."
        )
    for variable, twin in zip(own, destination):
        # A copy: JAX may delete a buffer that two models share.
        twin.assign(kernels.get(id(variable), ops.copy(variable.value)))


# --------------------------------------------------------------- owners


class SparseOwnerMixin:
    """A layer whose rebuilt-in-code sublayers were converted: it saves and replays the plan."""

    def get_config(self):
        base = type(self).__mro__[2]  # (owner class, mixin, base, ...)
        return {
            "kind": "owner",
            "base": {**_identity(base), "config": base.get_config(self)},
            "converted": [dict(entry) for entry in self._sparse_plan],
        }

    def _post_build(self):
        super()._post_build()
        self._apply_sparse_plan()

    def build_from_config(self, config):
        # A subclassed model is built by running its call, without `_post_build`.
        super().build_from_config(config)
        self._apply_sparse_plan()

    def _apply_sparse_plan(self):
        for entry in self._sparse_plan:
            target = resolve_path(self, entry["path"])
            if isinstance(target, SparseKernelMixin):
                continue  # converted already
            cls = sparse_class_for(type(target))
            unit_axes = entry.get("unit_axes")
            if cls is not None and target.built:
                # A layer the owner's config rebuilds quantized (keras-hub's per-layer dtype
                # policies) was pruned, then quantized: its masks come back beside the
                # quantized kernel, and the file's values are loaded into both.
                convert_layer(target, entry["sparse"], unit_axes, restoring=True)
            elif cls is not None:
                # Built later, on its first call: a fresh sparse layer in its place.
                config = {**target.get_config(), **entry["sparse"]}
                fresh = cls.from_config(config)
                if unit_axes is not None:
                    object.__setattr__(fresh, "_sparse_unit_axes", tuple(unit_axes))
                replace_sublayer(self, entry["path"], fresh)
            else:
                raise ValueError(
                    f"The saved model pruned a layer at {'.'.join(map(str, entry['path']))} "
                    f"of '{self.name}', but the rebuilt model holds {target!r} there."
                )


@functools.cache
def _owner_class(cls):
    owner = type(
        cls.__name__,
        (SparseOwnerMixin, cls),
        {"__module__": __name__, "__doc__": cls.__doc__},
    )
    _register_saved_name(owner)
    return owner


def _become_owner(layer):
    if not isinstance(layer, SparseOwnerMixin):
        layer.__class__ = _owner_class(type(layer))
        object.__setattr__(layer, "_sparse_plan", [])


def _attributes(layer):
    items = dict(vars(layer))
    items.update(getattr(layer, "_modules", None) or {})  # PyTorch keeps sublayers there
    return items


def find_path(owner, target):
    """The attribute path from `owner` to `target` (names, list indices, dict keys), or `None`."""
    queue, seen = [(owner, [])], {id(owner)}
    while queue:
        obj, path = queue.pop(0)
        if isinstance(obj, keras.layers.Layer):
            children = sorted(
                (name, value)
                for name, value in _attributes(obj).items()
                if name not in ("_layers", "_tracker", "_inbound_nodes", "_outbound_nodes")
                and not name.startswith("__")
            )
        elif isinstance(obj, (list, tuple)):
            children = list(enumerate(obj))
        elif isinstance(obj, dict):
            children = [(k, v) for k, v in obj.items() if isinstance(k, str)]
        else:
            continue
        for key, value in children:
            if value is target:
                return path + [key]
            if isinstance(value, (keras.layers.Layer, list, tuple, dict)) and id(value) not in seen:
                seen.add(id(value))
                queue.append((value, path + [key]))
    return None


def replace_sublayer(owner, path, new):
    """Put `new` where `path` leads from `owner`, at the same place in Keras's tracking."""
    holder = resolve_path(owner, path[:-1])
    old = resolve_path(owner, path)
    tracked = [h for h in (holder, resolve_path(owner, path[:-2]) if len(path) > 1 else None)]
    tracked = [h for h in tracked if isinstance(h, keras.layers.Layer)][:1]
    parent = tracked[0] if tracked else owner
    layers = parent._layers
    index = next((i for i, layer in enumerate(layers) if layer is old), len(layers))
    was_locked = parent._tracker.locked
    parent._tracker.unlock()
    try:
        parent._tracker.untrack(old)
        if isinstance(path[-1], int) or isinstance(holder, dict):
            holder[path[-1]] = new
        else:
            setattr(holder, path[-1], new)
        if new in layers:
            layers.remove(new)
            layers.insert(index, new)
    finally:
        if was_locked:
            parent._tracker.lock()


def resolve_path(owner, path):
    obj = owner
    for key in path:
        obj = obj[key] if isinstance(key, int) or isinstance(obj, dict) else getattr(obj, key)
    return obj


def _captures(parent, child):
    """Whether `parent` saves `child`'s class and config (a functional graph or Sequential)."""
    from keras.src.models.functional import Functional

    for container in (keras.Sequential, Functional):
        if isinstance(parent, container) and type(parent).get_config is container.get_config:
            return child in parent.layers
    return False


def _rebuilt_from_saved_config(layer, root, parents):
    """Whether a load rebuilds `layer` from the config its parent saves: its parent captures
    it, and is the root or itself so rebuilt. A functional model made in another layer's
    code (keras-hub's SegFormerBackbone makes one of its image encoder's layers) captures
    layers whose saved configs no load reads."""
    parent = parents[id(layer)]
    if not _captures(parent, layer):
        return False
    return parent is root or _rebuilt_from_saved_config(parent, root, parents)


def record_conversion(root, layer, parents, options, unit_axes=None):
    """Note in the owner of `layer` (if it has one) that `layer` was converted with `options`.

    `parents` maps `id(layer) -> parent` for the walk of `root`; `unit_axes`
    as given to `convert_layer`.
    """
    if _rebuilt_from_saved_config(layer, root, parents):
        return None
    owner = parents[id(layer)]
    while owner is not root and not _rebuilt_from_saved_config(owner, root, parents):
        owner = parents[id(owner)]
    path = find_path(owner, layer)
    if path is None:
        raise ValueError(
            f"Cannot find layer '{layer.name}' among the attributes of '{owner.name}', so "
            "its conversion could not be saved with the model."
        )
    _become_owner(owner)
    entry = {"path": path, "sparse": dict(options)}
    if unit_axes is not None:
        entry["unit_axes"] = list(unit_axes)
    owner._sparse_plan.append(entry)
    return owner


def parent_map(root):
    return {id(layer): parent for layer, parent in walk(root)}
