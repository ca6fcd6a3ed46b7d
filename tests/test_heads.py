"""Whole attention heads: `SparseMultiHeadAttention(granularity="head")` and
`sparsify(granularity="head")`, and `shrink` removing them, against a NumPy reference of
attention with those heads left out."""

import keras
import numpy as np
import pytest
from backend_utils import to_numpy

import keras_sparse as ks

HEADS, KEY_DIM, WIDTH = 4, 3, 8


def _attention_reference(layer, x, kept):
    """Self-attention of `x` in NumPy, with only the heads `kept`."""

    def project(dense):
        kernel, bias = to_numpy(dense.kernel), to_numpy(dense.bias)
        return np.einsum("btd,dhk->bthk", x, kernel) + bias

    q, k, v = (project(layer._query_dense), project(layer._key_dense), project(layer._value_dense))
    scores = np.einsum("bqhk,bvhk->bhqv", q, k) / np.sqrt(KEY_DIM)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    heads = np.einsum("bhqv,bvhk->bqhk", weights, v)
    output_kernel = to_numpy(layer._output_dense.kernel)
    return np.einsum("bqhk,hkd->bqd", heads[:, :, kept], output_kernel[kept]) + to_numpy(
        layer._output_dense.bias
    )


def _model(**kwargs):
    inputs = keras.Input((5, WIDTH))
    attention = ks.SparseMultiHeadAttention(HEADS, KEY_DIM, name="attention", **kwargs)
    h = attention(inputs, inputs)
    outputs = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(inputs, outputs), attention


def _prune_heads(attention, heads):
    threshold = np.zeros(HEADS, "float32")
    threshold[heads] = 1e3
    attention._output_dense.reset_threshold(threshold)
    attention._output_dense.hard_prune()


@pytest.fixture
def x(rng):
    return rng.normal(size=(3, 5, WIDTH)).astype("float32")


def test_head_granularity_has_one_threshold_per_head_on_the_output_projection():
    _, attention = _model(granularity="head")
    assert tuple(attention._output_dense.threshold.shape) == (HEADS,)
    # The query, key and value projections stay dense: a dead head's go at shrink().
    assert [
        type(getattr(attention, f"_{n}_dense")).__name__ for n in ("query", "key", "value")
    ] == ["EinsumDense"] * 3
    assert attention.alive_heads() == HEADS


def test_pruned_heads_leave_the_output_as_numpy_attention_without_them(x):
    _, attention = _model(granularity="head")
    _prune_heads(attention, [1, 3])
    assert attention.alive_heads() == 2
    expected = _attention_reference(attention, x, [0, 2])
    np.testing.assert_allclose(to_numpy(attention(x, x)), expected, atol=1e-5)
    # Training mode reads the soft mask, slightly below one for the kept heads.
    np.testing.assert_allclose(to_numpy(attention(x, x, training=True)), expected, atol=1e-3)


def test_shrink_rebuilds_attention_with_fewer_heads_and_equal_outputs(x):
    model, attention = _model(granularity="head")
    _prune_heads(attention, [0, 2, 3])
    result = ks.shrink(model)
    new = result.model.get_layer("attention")
    assert type(new) is keras.layers.MultiHeadAttention and new.num_heads == 1
    row = {r.name: r for r in result.layers}["attention"]
    assert (row.units_before, row.units_after, row.dead_kept) == (HEADS, 1, 0)
    np.testing.assert_allclose(
        to_numpy(result.model(x, training=False)), to_numpy(model(x, training=False)), atol=1e-5
    )
    np.testing.assert_allclose(
        to_numpy(new(x, x)), _attention_reference(attention, x, [1]), atol=1e-5
    )
    assert result.flops_after < result.flops_before and result.params_after < result.params_before


def test_every_head_pruned_keeps_one_and_says_why(x):
    model, attention = _model(granularity="head")
    _prune_heads(attention, [0, 1, 2, 3])
    result = ks.shrink(model)
    row = {r.name: r for r in result.layers}["attention"]
    assert row.units_after == 1 and "every head" in row.reason
    np.testing.assert_allclose(
        to_numpy(result.model(x, training=False)), to_numpy(model(x, training=False)), atol=1e-5
    )


def test_head_granularity_survives_a_keras_file(tmp_path, x):
    model, attention = _model(granularity="head")
    _prune_heads(attention, [2])
    path = tmp_path / "heads.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    again = loaded.get_layer("attention")
    assert again.get_config()["granularity"] == "head" and again.alive_heads() == 3
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-6)


def test_the_scheduler_prunes_exactly_half_the_heads(rng):
    model, attention = _model(granularity="head")
    x = rng.normal(size=(64, 5, WIDTH)).astype("float32")
    y = (x[:, :, 0].mean(axis=1) > 0).astype("int32")
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    schedule = ks.PolynomialDecay(0.5, begin_step=0, end_step=6)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[ks.SparsityScheduler(schedule)])
    assert attention.alive_heads() == HEADS // 2
    kernel = to_numpy(attention._output_dense.kernel)
    alive = np.any(kernel.reshape(HEADS, -1) != 0, axis=1)
    assert alive.sum() == HEADS // 2


def test_head_granularity_is_refused_where_there_are_no_heads():
    with pytest.raises(ValueError, match="SparseMultiHeadAttention"):
        ks.SparseLinear(4, granularity="head")
    model, _ = _model()
    with pytest.raises(ValueError, match="sparse already"):
        ks.sparsify(model, granularity="head")
    dense = keras.Sequential([keras.Input((5, WIDTH)), keras.layers.Dense(2, name="fc")])
    with pytest.raises(ValueError, match=r"no MultiHeadAttention layer.*attention layers: \[\]"):
        ks.sparsify(dense, granularity="head")
    _, attention = _model()
    with pytest.raises(ValueError, match="granularity='head'"):
        attention.alive_heads()


def _stock_model():
    inputs = keras.Input((5, WIDTH))
    h = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, name="attention")(inputs, inputs)
    h = keras.layers.Dense(6, activation="relu", name="ffn")(h)
    outputs = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(inputs, outputs)


def test_sparsify_heads_of_a_stock_attention_then_shrink_and_reload(tmp_path, x):
    model = _stock_model()
    sparse = ks.sparsify(model, granularity="head")
    attention = sparse.get_layer("attention")
    # Only the output projection is masked, one threshold per head; the rest stays stock.
    assert tuple(attention._output_dense.threshold.shape) == (HEADS,)
    assert [layer.name for layer in ks.sparse_layers(sparse)] == ["attention_output"]
    np.testing.assert_allclose(to_numpy(sparse(x)), to_numpy(model(x)), atol=1e-6)
    _prune_heads(attention, [0, 3])
    np.testing.assert_allclose(
        to_numpy(attention(x, x)), _attention_reference(attention, x, [1, 2]), atol=1e-5
    )
    path = tmp_path / "heads.keras"
    sparse.save(path)
    loaded = keras.saving.load_model(path)
    again = loaded.get_layer("attention")._output_dense
    assert tuple(again.threshold.shape) == (HEADS,)
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(sparse(x)), atol=1e-6)
    result = ks.shrink(sparse)
    assert result.model.get_layer("attention").num_heads == 2
    np.testing.assert_allclose(to_numpy(result.model(x)), to_numpy(sparse(x)), atol=1e-5)


def test_sparsify_heads_refuses_a_selection_without_heads_and_changes_nothing():
    model = _stock_model()
    before = [to_numpy(w) for w in model.weights]
    with pytest.raises(ValueError, match=r"matched layers without heads: \['ffn'\]"):
        ks.sparsify(model, select=["attention", "ffn"], granularity="head", inplace=True)
    assert not ks.sparse_layers(model)
    assert all(np.array_equal(a, to_numpy(w)) for a, w in zip(before, model.weights))
    # The two-call recipe: heads, then the feed-forward's neurons.
    sparse = ks.sparsify(model, select=keras.layers.MultiHeadAttention, granularity="head")
    sparse = ks.sparsify(sparse, select="^ffn$", granularity="neuron", inplace=True)
    assert [layer.name for layer in ks.sparse_layers(sparse)] == ["attention_output", "ffn"]


def test_a_second_sparsify_with_the_default_select_converts_only_what_is_still_stock(x):
    # The two-call recipe with `select=None` in the second call: the head-pruned output
    # projection keeps its one threshold per head, everything else is converted, and the
    # outputs are the stock model's.
    model = _stock_model()
    sparse = ks.sparsify(model, select=keras.layers.MultiHeadAttention, granularity="head")
    ks.sparsify(sparse, inplace=True)
    names = [layer.name for layer in ks.sparse_layers(sparse)]
    assert sorted(names) == sorted(["query", "key", "value", "attention_output", "ffn", "out"])
    attention = sparse.get_layer("attention")
    assert tuple(attention._output_dense.threshold.shape) == (HEADS,)
    assert attention._query_dense.mask_options.granularity == "weight"
    np.testing.assert_allclose(to_numpy(sparse(x)), to_numpy(model(x)), atol=1e-6)
    with pytest.raises(ValueError, match="is sparse already: there is nothing to convert"):
        ks.sparsify(sparse)
