"""The model artifact: compiled inference gives LightGBM's numbers, and compiles once."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from churn import model as model_module
from churn.model import compile_booster, load_model, path_contributions, path_table


def _booster_file(folder: Path, seed: int, leaves: int = 7) -> Path:
    """A real LightGBM model on data with missing values, saved as text."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2_000, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(size=2_000) > 0).astype(int)
    x[rng.random(x.shape) < 0.2] = np.nan
    params = {"objective": "binary", "num_leaves": leaves, "verbose": -1, "seed": seed}
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
