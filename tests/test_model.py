"""The model artifact: compiled inference gives LightGBM's numbers, and compiles once."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from churn import model as model_module
from churn.io import map_in_threads
from churn.model import (
    DENSE_PATTERNS,
    PATTERN_MIN_ROWS,
    ZERO_BAND,
    compile_booster,
    feature_cells,
    load_model,
    path_contributions,
    path_table,
    pattern_codes,
    split_patterns,
    treeshap,
)


def _booster_file(folder: Path, seed: int, leaves: int = 7, **params: object) -> Path:
    """A real LightGBM model on data with missing values and zeros, saved as text."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2_000, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(size=2_000) > 0).astype(int)
    x[rng.random(x.shape) < 0.2] = np.nan
    x[rng.random(x.shape) < 0.1] = 0.0
    params = {"objective": "binary", "num_leaves": leaves, "verbose": -1, "seed": seed, **params}
    booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=30)
    path = folder / f"booster{seed}.txt"
    booster.save_model(str(path))
    return path


def test_compiled_booster_predicts_what_lightgbm_predicts_missing_values_included(tmp_path):
    path = _booster_file(tmp_path, seed=1)
    x = np.random.default_rng(7).normal(size=(500, 4))
    x[::3, 0] = np.nan
    x[::5, 2] = np.nan
    compiled = compile_booster(path, tmp_path / "cache")
    expected = lgb.Booster(model_file=str(path)).predict(x)
    np.testing.assert_allclose(compiled.predict(x), expected, rtol=0, atol=1e-12)


def test_compiled_code_is_cached_per_model(tmp_path):
    cache = tmp_path / "cache"
    first = _booster_file(tmp_path, seed=1)
    compile_booster(first, cache)
    (cached,) = cache.iterdir()
    written = cached.stat().st_mtime_ns
    x = np.random.default_rng(3).normal(size=(50, 4))
    again = compile_booster(first, cache)
    assert cached.stat().st_mtime_ns == written, "a second load must reuse the object code"
    np.testing.assert_allclose(
        again.predict(x), lgb.Booster(model_file=str(first)).predict(x), rtol=0, atol=1e-12
    )
    compile_booster(_booster_file(tmp_path, seed=2), cache)
    assert len(list(cache.glob("*.o"))) == 2, "another model gets its own object code"


def test_large_batches_take_the_compiled_path_with_the_same_probabilities(pipeline):
    paths = pipeline.settings.paths
    model = load_model(str(paths.model))
    snapshot = pd.read_parquet(paths.features / "test.parquet")
    by_lightgbm = model.predict_proba(snapshot)
    model.compiled_min_rows = 1
    by_compiled = model.predict_proba(snapshot)
    assert model._compiled is not None
    np.testing.assert_allclose(by_compiled, by_lightgbm, rtol=0, atol=1e-12)


def test_split_patterns_by_hand():
    # split 0: feature 0 <= 1 (NaN counts as 0); split 1: feature 1 <= -2 (zero and NaN go left)
    tree = {
        "tree_structure": {
            **{"split_feature": 0, "threshold": 1.0, "decision_type": "<="},
            **{"missing_type": "None", "default_left": False},
            "left_child": {"leaf_value": 0.0},
            "right_child": {
                **{"split_feature": 1, "threshold": -2.0, "decision_type": "<="},
                **{"missing_type": "Zero", "default_left": True},
                "left_child": {"leaf_value": 1.0},
                "right_child": {"leaf_value": 2.0},
            },
        }
    }
    patterns = split_patterns([tree], n_features=2)
    below_band = np.nextafter(-ZERO_BAND, -np.inf)
    assert patterns.edges[0].tolist() == [below_band, ZERO_BAND, 1.0]
    assert patterns.edges[1].tolist() == [-2.0, below_band, ZERO_BAND]
    # cells: one per edge (values up to it), above every edge, NaN
    assert {f: b.tolist() for f, b in patterns.trees[0]} == {
        0: [1, 1, 1, 0, 1],
        1: [2, 0, 2, 0, 2],
    }
    x = np.array([[0.5, -3.0], [2.0, 0.0], [np.nan, 5.0], [1.0, np.nan], [-1.0, -1.0]])
    cells = feature_cells(x, patterns.edges)
    assert cells.tolist() == [[2, 3, 4, 2, 0], [0, 2, 3, 4, 1]]
    assert pattern_codes(patterns.trees[0], cells).tolist() == [3, 2, 1, 3, 1]


@pytest.mark.parametrize(
    ("leaves", "params", "grouped"),
    [
        (15, {}, "table"),  # missing values: NaN splits
        (15, {"zero_as_missing": True}, "table"),  # zeros are missing: Zero splits
        (15, {"use_missing": False}, "table"),  # NaN is zero: None splits
        (40, {"min_data_in_leaf": 5}, "sorted"),  # 39 splits: codes too wide for a table
        (80, {"min_data_in_leaf": 5}, "each row"),  # over 63 splits: rows not grouped
    ],
)
def test_treeshap_by_split_pattern_is_lightgbms(tmp_path, leaves, params, grouped):
    booster = lgb.Booster(model_file=str(_booster_file(tmp_path, 4, leaves, **params)))
    patterns = split_patterns(booster.dump_model()["tree_info"], 4)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(3_000, 4))
    x[rng.random(x.shape) < 0.1] = np.nan
    x[rng.random(x.shape) < 0.1] = 0.0
    for j, edges in enumerate(patterns.edges):  # values exactly on thresholds and band edges
        on_edge = rng.random(len(x)) < 0.2
        x[on_edge, j] = rng.choice(edges, size=on_edge.sum())
    x[:4] = [[np.inf] * 4, [-np.inf] * 4, [ZERO_BAND] * 4, [-ZERO_BAND] * 4]
    ungrouped = sum(t is None for t in patterns.trees)
    assert (ungrouped > 0) == (grouped == "each row")
    if grouped == "sorted":
        codes = [pattern_codes(t, feature_cells(x, patterns.edges)) for t in patterns.trees]
        assert max(c.max() for c in codes) >= DENSE_PATTERNS
    expected = booster.predict(x, pred_contrib=True)[:, :-1]
    np.testing.assert_allclose(treeshap(booster, patterns, x), expected, rtol=0, atol=1e-9)


def test_treeshap_of_batches_on_several_threads_is_lightgbms(tmp_path):
    # Each tree's stand-ins are predicted with their own start iteration, which LightGBM
    # records on the booster: batches explained side by side must not mix up the trees.
    booster = lgb.Booster(model_file=str(_booster_file(tmp_path, 5, leaves=15)))
    patterns = split_patterns(booster.dump_model()["tree_info"], 4)
    batches = list(np.random.default_rng(5).normal(size=(12, 2_000, 4)))
    explained = list(map_in_threads(lambda x: treeshap(booster, patterns, x), batches, 4))
    for x, contributions in zip(batches, explained, strict=True):
        expected = booster.predict(x, pred_contrib=True)[:, :-1]
        np.testing.assert_allclose(contributions, expected, rtol=0, atol=1e-9)


def test_treeshap_of_few_rows_is_lightgbms_and_of_none_is_empty(tmp_path):
    booster = lgb.Booster(model_file=str(_booster_file(tmp_path, 4)))
    patterns = split_patterns(booster.dump_model(num_iteration=20)["tree_info"], 4)
    x = np.random.default_rng(1).normal(size=(5, 4))
    expected = booster.predict(x, pred_contrib=True, num_iteration=20)[:, :-1]
    np.testing.assert_allclose(treeshap(booster, patterns, x), expected, rtol=0, atol=1e-12)
    assert treeshap(booster, patterns, x[:0]).shape == (0, 4)


def test_treeshap_of_a_model_with_categorical_splits_is_lightgbms():
    rng = np.random.default_rng(2)
    x = np.column_stack([rng.normal(size=2_000), rng.integers(0, 6, 2_000).astype(float)])
    y = (x[:, 0] + (x[:, 1] % 2) + rng.normal(size=2_000) > 0.5).astype(int)
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "seed": 2}
    booster = lgb.train(params, lgb.Dataset(x, y, categorical_feature=[1]), num_boost_round=10)
    patterns = split_patterns(booster.dump_model()["tree_info"], 2)
    assert any(t is None for t in patterns.trees)
    expected = booster.predict(x, pred_contrib=True)[:, :-1]
    np.testing.assert_allclose(treeshap(booster, patterns, x), expected, rtol=0, atol=1e-9)


def test_path_table_by_hand():
    # root splits feature 0: leaf 0 (value 2, 30 rows) | feature 1: leaf 1 (4, 10) | leaf 2 (-2, 10)
    # expected values: right subtree (40 - 20) / 20 = 1, root (60 + 20) / 50 = 1.6
    tree = {
        "num_leaves": 3,
        "tree_structure": {
            "split_feature": 0,
            "left_child": {"leaf_index": 0, "leaf_value": 2.0, "leaf_count": 30},
            "right_child": {
                "split_feature": 1,
                "left_child": {"leaf_index": 1, "leaf_value": 4.0, "leaf_count": 10},
                "right_child": {"leaf_index": 2, "leaf_value": -2.0, "leaf_count": 10},
            },
        },
    }
    stump = {"num_leaves": 1, "tree_structure": {"leaf_value": 0.5}}
    table, first = path_table([tree, stump], n_features=2)
    assert first.tolist() == [0, 3]
    got = path_contributions(table, first, np.array([[0, 0], [1, 0], [2, 0]]))
    np.testing.assert_allclose(got, [[0.4, 0.0], [-0.6, 3.0], [-0.6, -3.0]])


def test_path_contributions_add_up_like_treeshap_and_equal_it_on_stumps(tmp_path):
    x = np.random.default_rng(5).normal(size=(300, 4))
    x[::4, 1] = np.nan
    for seed, exact in ((1, False), (3, True)):
        booster = lgb.Booster(
            model_file=str(_booster_file(tmp_path, seed, leaves=2 if exact else 7))
        )
        table, first = path_table(booster.dump_model()["tree_info"], 4)
        path = path_contributions(table, first, booster.predict(x, pred_leaf=True))
        shap = booster.predict(x, pred_contrib=True)[:, :-1]
        np.testing.assert_allclose(path.sum(axis=1), shap.sum(axis=1), rtol=0, atol=1e-9)
        if exact:  # one split per tree: both give the split's whole change to its feature
            np.testing.assert_allclose(path, shap, rtol=0, atol=1e-9)
        else:
            assert np.abs(path - shap).max() > 1e-3, "deeper trees: the two attributions differ"


def test_model_path_attribution_in_blocks_adds_up_like_treeshap(pipeline, monkeypatch):
    paths = pipeline.settings.paths
    model = load_model(str(paths.model))
    snapshot = pd.read_parquet(paths.features / "test.parquet")
    monkeypatch.setattr(model_module, "PATH_ROWS", 1_000)  # several blocks
    path = model.contributions(snapshot, "path")
    shap = model.contributions(snapshot, "treeshap")
    assert path.columns.tolist() == shap.columns.tolist() == model.feature_names
    assert path.index.equals(snapshot.index)
    np.testing.assert_allclose(path.sum(axis=1), shap.sum(axis=1), rtol=0, atol=1e-9)
    agree = (path.to_numpy().argmax(axis=1) == shap.to_numpy().argmax(axis=1)).mean()
    assert 0.6 < agree < 1.0, agree


def test_model_treeshap_is_lightgbms_on_the_pipeline_model(pipeline):
    model = load_model(str(pipeline.settings.paths.model))
    snapshot = pd.read_parquet(pipeline.settings.paths.features / "test.parquet")
    assert len(snapshot) >= PATTERN_MIN_ROWS  # grouped by pattern, not one LightGBM call
    expected = model.booster.predict(
        model.matrix(snapshot), pred_contrib=True, num_iteration=model.card.best_iteration
    )[:, :-1]
    got = model.contributions(snapshot, "treeshap")
    assert got.columns.tolist() == model.feature_names
    assert got.index.equals(snapshot.index)
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=0, atol=1e-9)
