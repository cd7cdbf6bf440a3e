"""Train stage: LightGBM on stacked snapshots, tuned, blended and calibrated out of time.

The newest training snapshot is held out; the older snapshots fit the trees. On the held-out
one, in this order: early stopping; an optional Optuna search over the LightGBM parameters
(``train.n_trials``); the choice of a blend with the BTYD churn probability (the booster
alone, or a weighted mean with BG/NBD's P(no purchase), whichever ranks best: on small data
the BTYD score carries the model); isotonic calibration of the blended score. The
model is logged to MLflow with every trial as a nested run, registered, given the alias
``challenger``, and saved under ``models/`` for the downstream stages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import mlflow
import numpy as np
import optuna
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score

from churn import ChurnError
from churn.config import MlflowSettings, Paths, TrainSettings
from churn.drift import profile
from churn.features import ID_COLUMNS, LABEL
from churn.io import write_json
from churn.metrics import score_ranks, weighted_auc
from churn.model import ChurnModel, ModelCard, blend, calibrate, usable_cpus, write_artifacts
from churn.progress import progress

NON_FEATURES = (*ID_COLUMNS, LABEL, "r_score", "f_score", "m_score", "rfm_segment", "season_prior")
TUNED = ("learning_rate", "num_leaves", "min_child_samples", "feature_fraction", "lambda_l2")
BLEND_COLUMNS = ("bgnbd_p_no_purchase",)
BLEND_WEIGHTS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)  # on the booster

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Blend:
    """The chosen score: ``weight`` on the booster, the rest on ``column`` (None: booster)."""

    column: str | None
    weight: float
    validation_auc: dict[str, float]  # of every candidate, e.g. "bgnbd_p_no_purchase@0.3"
    standard_error: float  # bootstrap SE of the best candidate's AUC gain over the BTYD score


@dataclass(frozen=True)
class TrainSummary:
    run_id: str
    model_version: str
    best_iteration: int
    validation_auc: float


def feature_columns(snapshot: pd.DataFrame) -> list[str]:
    """Model inputs: every numeric snapshot column except ids and the label."""
    return [
        c
        for c in snapshot.columns
        if c not in NON_FEATURES and pd.api.types.is_numeric_dtype(snapshot[c])
    ]


def split_by_cutoff(snapshots: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split stacked snapshots into (older ones, newest one) for out-of-time validation.

    Raises
    ------
    ChurnError
        With fewer than two cutoffs, or when either part holds only churned or only
        retained customers: a model can neither learn nor be validated on one class.
    """
    cutoffs = sorted(snapshots["cutoff"].unique())
    if len(cutoffs) < 2:
        raise ChurnError(
            "training needs at least 2 snapshots (features.n_snapshots >= 2): "
            "the newest one is held out for early stopping and calibration"
        )
    newest = snapshots["cutoff"] == cutoffs[-1]
    fit, valid = snapshots[~newest], snapshots[newest]
    for part, name in ((fit, "fitting"), (valid, "validation")):
        churned = int(part[LABEL].sum())
        if churned in (0, len(part)):
            dates = ", ".join(str(c) for c in sorted(part["cutoff"].unique()))
            kind = "churned" if churned else "retained"
            raise ChurnError(
                f"train.parquet: the {name} snapshot(s) at {dates} hold {len(part)} customers, "
                f"all {kind}; a model needs both churned and retained customers. Use data "
                "with more customers or a longer history, or change features.horizon_days, "
                "n_snapshots or snapshot_step_days"
            )
    return fit, valid


def stratified_sample(snapshots: pd.DataFrame, max_rows: int, *, seed: int) -> pd.DataFrame:
    """At most ``max_rows`` rows, drawn without replacement within each (cutoff, label)
    stratum in proportion to its size; rows keep their order. All rows when they fit.

    Each stratum gets ``floor(size * max_rows / total)`` rows and the rows left over go to
    the largest remainders (ties: the earlier stratum), so the shares of cutoffs and labels
    stay as close to the full table's as whole rows allow.

    >>> frame = pd.DataFrame({"cutoff": [1] * 6 + [2] * 4, "churned": [0, 0, 0, 0, 1, 1] * 1
    ...                       + [0, 1, 1, 1]})
    >>> stratified_sample(frame, 5, seed=0).groupby(["cutoff", "churned"]).size().tolist()
    [2, 1, 1, 1]
    """
    if len(snapshots) <= max_rows:
        return snapshots
    strata = snapshots.groupby(["cutoff", LABEL], sort=True).indices
    sizes = np.array([len(rows) for rows in strata.values()])
    share = sizes * max_rows / sizes.sum()
    quota = np.floor(share).astype("int64")
    leftover = max_rows - int(quota.sum())
    quota[np.argsort(-(share - quota), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    drawn = zip(strata.values(), quota, strict=True)
    keep = [rng.choice(rows, size=n, replace=False) for rows, n in drawn]
    return snapshots.iloc[np.sort(np.concatenate(keep))]


def read_sample(path: Path, max_rows: int, *, seed: int) -> tuple[pd.DataFrame, int]:
    """:func:`stratified_sample` of the snapshot file ``path`` and the file's row count. The
    file is read in batches that keep only the drawn rows: memory holds the sample, not the
    file."""
    keys = pd.read_parquet(path, columns=["cutoff", LABEL])
    if len(keys) <= max_rows:
        return pd.read_parquet(path), len(keys)
    drawn = stratified_sample(keys, max_rows, seed=seed).index.to_numpy()  # ascending
    file = pq.ParquetFile(path)
    batches, start = [], 0
    for batch in file.iter_batches():
        first, stop = np.searchsorted(drawn, [start, start + batch.num_rows])
        batches.append(batch.take(drawn[first:stop] - start))
        start += batch.num_rows
    table = pa.Table.from_batches(batches, schema=file.schema_arrow)
    return table.to_pandas(), len(keys)


def lgb_params(settings: TrainSettings, seed: int) -> dict[str, Any]:
    """LightGBM booster parameters from the train settings. With ``deterministic`` the
    model does not depend on the number of threads (a test checks it)."""
    return {
        "objective": "binary",
        "metric": "auc",
        "verbosity": -1,
        "seed": seed,
        "deterministic": True,
        "num_threads": settings.num_threads or usable_cpus(),
        "learning_rate": settings.learning_rate,
        "num_leaves": settings.num_leaves,
        "min_child_samples": settings.min_child_samples,
        "feature_fraction": settings.feature_fraction,
        "bagging_fraction": settings.bagging_fraction,
        "bagging_freq": settings.bagging_freq,
        "lambda_l2": settings.lambda_l2,
    }


def fit_booster(
    fit: pd.DataFrame,
    valid: pd.DataFrame,
    features: list[str],
    settings: TrainSettings,
    *,
    seed: int,
) -> lgb.Booster:
    """Boost on ``fit`` until the AUC on ``valid`` stops improving.

    The AUC is measured after every ``settings.eval_every`` trees and after the last one:
    each measure sorts the validation scores, which costs about half a tree. Boosting stops
    once ``settings.early_stopping_rounds`` trees have passed without a better AUC; the
    booster's ``best_iteration`` is the tree count of the best AUC measured.
    """
    train_set = lgb.Dataset(
        fit[features].astype("float64"),
        label=fit[LABEL],
        feature_name=features,
        free_raw_data=False,
    )
    valid_set = lgb.Dataset(
        valid[features].astype("float64"), label=valid[LABEL], reference=train_set
    )
    booster = lgb.Booster(lgb_params(settings, seed), train_set)
    booster.add_valid(valid_set, "valid_0")
    best_auc, best_trees = -np.inf, 0
    with progress("train: trees", settings.max_rounds) as advance:
        for trees in range(1, settings.max_rounds + 1):
            booster.update()
            advance(1)
            if trees % settings.eval_every and trees < settings.max_rounds:
                continue
            auc = booster.eval_valid()[0][2]
            if auc > best_auc:
                best_auc, best_trees = auc, trees
            elif trees - best_trees >= settings.early_stopping_rounds:
                break
    booster.best_iteration = best_trees
    booster.best_score = {"valid_0": {"auc": float(best_auc)}}
    # As lgb.train: keep the trees up to the best count and free the training data.
    booster.model_from_string(booster.model_to_string()).free_dataset()
    return booster


def tune(
    fit: pd.DataFrame,
    valid: pd.DataFrame,
    features: list[str],
    settings: TrainSettings,
    *,
    seed: int,
) -> tuple[TrainSettings, list[dict[str, Any]], lgb.Booster]:
    """Search LightGBM parameters for the best validation AUC in ``settings.n_trials`` Optuna
    trials, the first being the parameters as given; return the best settings, every trial
    and the booster of the best settings.

    Trials fit and validate on at most ``settings.tune_rows`` rows each (samples stratified
    by cutoff and label). The best trial's booster is returned when it saw every row;
    otherwise the best settings are fitted again on all of them.
    """
    boosters: dict[int, lgb.Booster] = {}
    tune_fit = stratified_sample(fit, settings.tune_rows, seed=seed)
    tune_valid = stratified_sample(valid, settings.tune_rows, seed=seed)

    def objective(trial: optuna.Trial) -> float:
        candidate = dataclasses.replace(
            settings,
            learning_rate=trial.suggest_float("learning_rate", 0.01, 0.1, log=True),
            num_leaves=trial.suggest_int("num_leaves", 4, 63, log=True),
            min_child_samples=trial.suggest_int("min_child_samples", 10, 200, log=True),
            feature_fraction=trial.suggest_float("feature_fraction", 0.5, 1.0),
            lambda_l2=trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
        )
        booster = fit_booster(tune_fit, tune_valid, features, candidate, seed=seed)
        trial.set_user_attr("best_iteration", int(booster.best_iteration))
        trial.set_user_attr("fit_rows", len(tune_fit))
        boosters[trial.number] = booster
        return float(booster.best_score["valid_0"]["auc"])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({name: getattr(settings, name) for name in TUNED})
    study.optimize(objective, n_trials=settings.n_trials)
    trials = [
        {"number": t.number, "validation_auc": t.value, **t.params, **t.user_attrs}
        for t in study.trials
    ]
    best = dataclasses.replace(settings, **study.best_params)
    if len(tune_fit) == len(fit) and len(tune_valid) == len(valid):
        return best, trials, boosters[study.best_trial.number]
    return best, trials, fit_booster(fit, valid, features, best, seed=seed)


def choose_blend(booster_p: np.ndarray, valid: pd.DataFrame, *, seed: int) -> Blend:
    """The blend of the booster's probability with a BTYD churn probability to score with.

    Candidates run from the BTYD score alone (weight 0 on the booster, nothing learned) to
    the booster alone. The booster's validation AUC is optimistic (early stopping and tuning
    looked at these customers), so the one-standard-error rule picks the candidate with the
    most BTYD weight whose AUC is within one bootstrap standard error of the best (200
    resamples of the validation customers, of the best's AUC gain over the BTYD score).
    """
    y = valid[LABEL].to_numpy()
    candidates: list[tuple[str | None, float, np.ndarray]] = []
    for column in BLEND_COLUMNS:
        if column in valid and valid[column].notna().all():
            btyd_p = valid[column].to_numpy("float64")
            candidates += [(column, w, blend(booster_p, btyd_p, w)) for w in BLEND_WEIGHTS[::-1]]
    candidates.append((None, 1.0, booster_p))
    aucs = [float(roc_auc_score(y, p)) for _, _, p in candidates]
    names = [f"{c}@{w}" if c else "booster" for c, w, _ in candidates]
    best = int(np.argmax(aucs))
    rng = np.random.default_rng(seed)
    best_ranks, btyd_ranks = score_ranks(candidates[best][2]), score_ranks(candidates[0][2])
    gaps = []
    for _ in range(200):
        counts = np.bincount(rng.integers(0, len(y), len(y)), minlength=len(y))
        if 0 < counts @ y < len(y):
            gaps.append(weighted_auc(y, best_ranks, counts) - weighted_auc(y, btyd_ranks, counts))
    standard_error = float(np.std(gaps)) if gaps else 0.0
    chosen = next(i for i, auc in enumerate(aucs) if auc >= aucs[best] - standard_error)
    column, weight, _ = candidates[chosen]
    return Blend(column, weight, dict(zip(names, aucs, strict=True)), standard_error)


def fit_calibration(y_raw: np.ndarray, y_true: np.ndarray) -> tuple[list[float], list[float]]:
    """Isotonic map from raw scores to probabilities, as its threshold points."""
    iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-4, y_max=1 - 1e-4)
    iso.fit(y_raw, y_true)
    return iso.X_thresholds_.tolist(), iso.y_thresholds_.tolist()


@dataclass(frozen=True)
class Fitted:
    """What :func:`build_model` produced: the model parts, and how they were chosen."""

    booster: lgb.Booster
    card: ModelCard
    valid: pd.DataFrame
    settings: TrainSettings  # after tuning
    blend: Blend
    trials: list[dict[str, Any]]


def build_model(
    snapshots: pd.DataFrame,
    settings: TrainSettings,
    spec: dict[str, Any],
    *,
    seed: int,
    drift_bins: int = 10,
) -> Fitted:
    """Tune, fit, blend and calibrate on the stacked snapshots.

    ``spec`` is the features stage's ``spec.json``: horizon and feature-definition hash.
    """
    fit, valid = split_by_cutoff(snapshots)
    features = feature_columns(snapshots)
    trials: list[dict[str, Any]] = []
    if settings.n_trials:
        settings, trials, booster = tune(fit, valid, features, settings, seed=seed)
    else:
        booster = fit_booster(fit, valid, features, settings, seed=seed)
    booster_p = booster.predict(
        valid[features].astype("float64"), num_iteration=booster.best_iteration
    )
    chosen = choose_blend(booster_p, valid, seed=seed)
    btyd_p = valid[chosen.column].to_numpy("float64") if chosen.column else None
    raw = blend(booster_p, btyd_p, chosen.weight)
    cal_x, cal_y = fit_calibration(raw, valid[LABEL].to_numpy())
    # A feature without any value in the snapshots (a window reaching before the data) is
    # one no tree can split on: its drift moves no score.
    reference = {
        f: profile(valid[f].to_numpy("float64"), bins=drift_bins)
        for f in features
        if snapshots[f].notna().any()
    }
    reference["churn_probability"] = profile(calibrate(raw, cal_x, cal_y), bins=drift_bins)
    card = ModelCard(
        features=features,
        horizon_days=int(spec["horizon_days"]),
        feature_hash=str(spec["feature_hash"]),
        train_cutoffs=sorted(str(c) for c in fit["cutoff"].unique()),
        validation_cutoff=str(valid["cutoff"].iloc[0]),
        best_iteration=int(booster.best_iteration),
        calibration_x=cal_x,
        calibration_y=cal_y,
        reference=reference,
        blend_column=chosen.column,
        blend_weight=chosen.weight,
        season_prior=_validation_prior(valid),
    )
    return Fitted(booster, card, valid, settings, chosen, trials)


def run(
    settings: TrainSettings,
    tracking: MlflowSettings,
    paths: Paths,
    *,
    seed: int,
    drift_bins: int = 10,
) -> TrainSummary:
    """Train, log and register the model; save it under ``paths.model``."""
    used, total = read_sample(paths.features / "train.parquet", settings.max_rows, seed=seed)
    spec = json.loads((paths.features / "spec.json").read_text())
    if len(used) < total:
        log.info(
            "training on %d of %d snapshot rows (train.max_rows), stratified by cutoff and label",
            len(used),
            total,
        )
    fitted = build_model(used, settings, spec, seed=seed, drift_bins=drift_bins)
    booster, card, valid = fitted.booster, fitted.card, fitted.valid
    # One scratch folder beside paths.model (a failed run's is cleared): the artifacts, and
    # the model saved from them, which replaces paths.model once the run is registered.
    staging = paths.model.parent / f".{paths.model.name}.artifacts"
    if staging.exists():
        shutil.rmtree(staging)
    artifacts = write_artifacts(booster, card, staging)
    example = valid[model_inputs(card)].head(5).astype("float64")
    model = ChurnModel()
    signature = input_signature(card)
    saved = staging / "saved"
    mlflow.pyfunc.save_model(
        path=str(saved),
        python_model=model,
        artifacts=artifacts,
        signature=signature,
        input_example=example,
    )
    use_experiment(tracking)
    with mlflow.start_run() as active:
        mlflow.log_params(
            {
                **lgb_params(fitted.settings, seed),
                "horizon_days": card.horizon_days,
                "feature_hash": card.feature_hash,
                "n_features": len(card.features),
                "train_rows": len(used),
                "train_rows_total": total,
                "train_rows_used": len(used),
                "train_max_rows": settings.max_rows,
                "train_sampled": len(used) < total,
                "train_cutoffs": ",".join(card.train_cutoffs),
                "validation_cutoff": card.validation_cutoff,
                "n_trials": settings.n_trials,
                "tune_rows": settings.tune_rows,
                "blend_column": card.blend_column or "none",
                "blend_weight": card.blend_weight,
                "blend_standard_error": fitted.blend.standard_error,
                "validation_season_prior": card.season_prior,
            }
        )
        mlflow.set_tag("train_sampled", str(len(used) < total).lower())
        chosen = fitted.blend
        log.info(
            "train: score = %.1f x booster + %.1f x %s (validation AUC: %s; booster alone %.4f, "
            "best %.4f, one standard error %.4f)",
            card.blend_weight,
            1 - card.blend_weight,
            card.blend_column or "nothing",
            f"{chosen.validation_auc[f'{card.blend_column}@{card.blend_weight}']:.4f}"
            if card.blend_column
            else f"{chosen.validation_auc['booster']:.4f}",
            chosen.validation_auc["booster"],
            max(chosen.validation_auc.values()),
            chosen.standard_error,
        )
        _log_trials(fitted.trials)
        mlflow.log_dict(fitted.blend.validation_auc, "blend_validation_auc.json")
        mlflow.log_dict(spec.get("btyd_fits", {}), "btyd_fits.json")
        validation_auc = float(booster.best_score["valid_0"]["auc"])
        mlflow.log_metrics(
            {"validation_auc": validation_auc, "best_iteration": card.best_iteration}
        )
        mlflow.log_dict(_importance(booster), "feature_importance.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=model,
            artifacts=artifacts,
            signature=signature,
            input_example=example,
            # Inferred once, for the saved copy (MLflow imports the model in a subprocess).
            pip_requirements=str(saved / "requirements.txt"),
            registered_model_name=tracking.registered_model,
        )
        version = str(info.registered_model_version)
        mlflow.MlflowClient().set_registered_model_alias(
            tracking.registered_model, "challenger", version
        )
    if paths.model.exists():
        shutil.rmtree(paths.model)
    saved.rename(paths.model)
    shutil.rmtree(staging)
    write_json(
        {
            "run_id": active.info.run_id,
            "registered_model": tracking.registered_model,
            "model_version": version,
            "model_uri": f"models:/{tracking.registered_model}/{version}",
        },
        paths.model_info,
    )
    return TrainSummary(
        run_id=active.info.run_id,
        model_version=version,
        best_iteration=card.best_iteration,
        validation_auc=validation_auc,
    )


def use_experiment(tracking: MlflowSettings) -> None:
    """Make ``tracking.experiment`` active, creating it where artifacts should live.

    A new experiment on a ``sqlite:///path/mlflow.db`` store keeps its artifacts in
    ``path/mlruns`` rather than in whatever folder the command happened to run from.
    """
    if mlflow.get_experiment_by_name(tracking.experiment) is None:
        location = tracking.artifact_location
        uri = mlflow.get_tracking_uri()
        if location is None and uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
        mlflow.create_experiment(tracking.experiment, artifact_location=location)
    mlflow.set_experiment(tracking.experiment)


def model_inputs(card: ModelCard) -> list[str]:
    """The snapshot columns the model reads: its features and, when it moves probabilities
    to the season of each cutoff, ``season_prior``."""
    return [*card.features, *(["season_prior"] if card.season_prior is not None else [])]


def input_signature(card: ModelCard) -> ModelSignature:
    """The MLflow signature of the model: every input a double (a count arrives as an
    integer, a count with a gap as a float; MLflow converts 32-bit integers, which snapshots
    hold), ``season_prior`` optional; the output a probability."""
    inputs = [ColSpec("double", n, required=n != "season_prior") for n in model_inputs(card)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([ColSpec("double")]))


def _validation_prior(valid: pd.DataFrame) -> float | None:
    """The validation snapshot's season prior, if the data reached back a year before it."""
    if "season_prior" not in valid or valid["season_prior"].isna().any():
        return None
    return float(valid["season_prior"].iloc[0])


def _log_trials(trials: list[dict[str, Any]]) -> None:
    """Each Optuna trial as a nested run of the active run."""
    for trial in trials:
        with mlflow.start_run(run_name=f"trial-{trial['number']}", nested=True):
            mlflow.log_params({k: v for k, v in trial.items() if k != "validation_auc"})
            mlflow.log_metric("validation_auc", trial["validation_auc"])


def _importance(booster: lgb.Booster) -> dict[str, dict[str, float]]:
    names = booster.feature_name()
    gain = booster.feature_importance("gain")
    split = booster.feature_importance("split")
    order = np.argsort(-gain, kind="stable")
    return {names[i]: {"gain": float(gain[i]), "split": int(split[i])} for i in order}
