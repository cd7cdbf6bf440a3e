"""The model artifact: compiled inference gives LightGBM's numbers, and compiles once."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from churn.model import compile_booster, load_model


def _booster_file(folder: Path, seed: int) -> Path:
    """A real LightGBM model on data with missing values, saved as text."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2_000, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(size=2_000) > 0).astype(int)
    x[rng.random(x.shape) < 0.2] = np.nan
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "seed": seed}
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
