"""Evaluate stage: the model against honest baselines on the out-of-time test snapshot.

Baselines are one-score logistic models fitted on the training snapshots (never the test):
``recency`` uses days since the last purchase, ``rfm`` the sum of the RFM quintile scores;
and the "buy till you die" models ``bgnbd`` and ``pareto_nbd``, scored by P(no purchase).
All scorers go through the same metric functions on the same customers. The new model gets
the registry alias ``champion`` when, on this same snapshot, its ROC-AUC is at most
``gate.max_auc_drop`` below the champion's and its calibration error within ``gate.max_ece``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from churn import btyd
from churn.config import EvaluateSettings, GateSettings, MlflowSettings, Paths
from churn.features import LABEL, btyd_fit_rows, btyd_inputs, too_few_buyers
from churn.io import write_csv, write_json
from churn.metrics import (
    GRID,
    calibration_table,
    classification_report,
    gains_points,
    precision_recall_points,
    roc_points,
)
from churn.model import ModelError, load_model
from churn.registry import CHAMPION, promote, version_by_alias

log = logging.getLogger(__name__)
BTYD_BASELINES = ("bgnbd", "pareto_nbd")


@dataclass(frozen=True)
class EvaluateSummary:
    metrics: dict[str, Any]
    promoted: bool


def baseline_scores(snapshot: pd.DataFrame) -> dict[str, np.ndarray]:
    """The single score each baseline ranks customers by (higher = riskier)."""
    return {
        "recency": np.log1p(snapshot["recency_days"].to_numpy(dtype="float64")),
        "rfm": -(snapshot[["r_score", "f_score", "m_score"]].sum(axis=1)).to_numpy("float64"),
    }


def baseline_probabilities(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, np.ndarray]:
    """Churn probabilities of each baseline: a logistic map fitted on the training snapshots."""
    fitted, scored = baseline_scores(train), baseline_scores(test)
    probabilities = {}
    for name, score in fitted.items():
        logit = LogisticRegression().fit(score.reshape(-1, 1), train[LABEL])
        probabilities[name] = logit.predict_proba(scored[name].reshape(-1, 1))[:, 1]
    return probabilities


def btyd_probabilities(
    test: pd.DataFrame, horizon_days: int, fit_customers: int
) -> dict[str, np.ndarray]:
    """P(no purchase in the next ``horizon_days``) under BG/NBD and Pareto/NBD.

    Each model is fitted by maximum likelihood on the test customers' history before the
    cutoff (x = purchase days - 1, t_x and T in weeks), which the snapshot holds: on at most
    ``fit_customers`` of them, the sample the features stage fits on at this cutoff. Every
    customer is scored; the churn probability the models imply is P(no purchase), not
    P(alive). With too few repeat buyers among them to fit (as in the features stage), there
    are no BTYD baselines: an empty dict, and a warning.
    """
    x, t_x, age = btyd_inputs(test)
    horizon = horizon_days / 7
    cutoff = test["cutoff"].iloc[0]
    rows = btyd_fit_rows(len(test), cutoff, fit_customers)
    reason = too_few_buyers(x[rows])
    if reason:
        log.warning("evaluate: no BG/NBD or Pareto/NBD baseline at cutoff %s: %s", cutoff, reason)
        return {}
    bgnbd = btyd.fit_bgnbd(x[rows], t_x[rows], age[rows])
    pareto = btyd.fit_pareto_nbd(x[rows], t_x[rows], age[rows])
    return {
        "bgnbd": btyd.bgnbd_probability_no_purchase(bgnbd.params, x, t_x, age, horizon=horizon),
        "pareto_nbd": btyd.pareto_nbd_probability_no_purchase(
            pareto.params, x, t_x, age, horizon=horizon
        ),
    }


def evaluation(
    y_true: np.ndarray, scorers: dict[str, np.ndarray], settings: EvaluateSettings
) -> dict[str, dict[str, float]]:
    """The metric set of every scorer on the same customers."""
    return {
        name: classification_report(
            y_true,
            y_prob,
            top_fraction=settings.top_fraction,
            capture_fraction=settings.capture_fraction,
            n_bins=settings.calibration_bins,
        )
        for name, y_prob in scorers.items()
    }


def curves(y_true: np.ndarray, scorers: dict[str, np.ndarray]) -> dict[str, pd.DataFrame]:
    """ROC, precision-recall and cumulative-gains curves, one column per scorer."""
    tables = {}
    for kind, x_name, points in (
        ("roc", "fpr", roc_points),
        ("precision_recall", "recall", precision_recall_points),
        ("gains", "targeted", gains_points),
    ):
        table = pd.DataFrame({x_name: GRID})
        for name, y_score in scorers.items():
            table[name] = points(y_true, y_score).to_numpy()
        tables[kind] = table.round(6)
    return tables


def gate_decision(
    challenger: dict[str, float], champion: dict[str, float] | None, settings: GateSettings
) -> tuple[bool, list[str]]:
    """Whether the challenger may become champion, with the reasons either way.

    >>> gate_decision({"roc_auc": 0.80, "ece": 0.02}, {"roc_auc": 0.81, "ece": 0.01},
    ...               GateSettings(max_auc_drop=0.02, max_ece=0.05))[0]
    True
    """
    reasons = []
    if challenger["ece"] > settings.max_ece:
        reasons.append(f"ece {challenger['ece']:.4f} > gate.max_ece {settings.max_ece}")
    if champion is not None and champion["roc_auc"] - challenger["roc_auc"] > settings.max_auc_drop:
        reasons.append(
            f"roc_auc {challenger['roc_auc']:.4f} is more than gate.max_auc_drop "
            f"{settings.max_auc_drop} below the champion's {champion['roc_auc']:.4f}"
        )
    if not reasons:
        reasons.append("no champion to compare with" if champion is None else "within the gate")
        return True, reasons
    return False, reasons


def run(
    settings: EvaluateSettings,
    gate: GateSettings,
    tracking: MlflowSettings,
    paths: Paths,
    *,
    horizon_days: int,
    btyd_fit_customers: int,
) -> EvaluateSummary:
    """Score the test snapshot, write metrics and plot data, and gate the champion alias."""
    test = pd.read_parquet(paths.features / "test.parquet")
    train = pd.read_parquet(paths.features / "train.parquet")
    model = load_model(str(paths.model))
    y_true = test[LABEL].to_numpy()
    scorers = {
        "model": model.predict_proba(test),
        **baseline_probabilities(train, test),
        **btyd_probabilities(test, horizon_days, btyd_fit_customers),
    }
    scores = evaluation(y_true, scorers, settings)
    info = json.loads(paths.model_info.read_text())
    spec = json.loads((paths.features / "spec.json").read_text())
    gate_report = _gate(
        tracking.registered_model,
        info["model_version"],
        scores["model"],
        test,
        y_true,
        spec,
        settings,
        gate,
    )
    metrics = {
        "test_cutoff": str(test["cutoff"].iloc[0]),
        "horizon_days": horizon_days,
        "n_customers": len(test),
        "churn_rate": float(y_true.mean()),
        "model": scores.pop("model"),
        "baselines": scores,
        "model_version": info["model_version"],
        "promoted_to_champion": gate_report["promoted"],
    }
    write_json(metrics, paths.metrics)
    write_json(gate_report, paths.gate_report)
    for kind, table in curves(y_true, scorers).items():
        # dvc.yaml plots both BTYD baselines: left out, they are empty columns (plots render).
        absent = [name for name in BTYD_BASELINES if name not in table]
        write_csv(table.assign(**dict.fromkeys(absent, np.nan)), paths.plots / f"{kind}.csv")
    write_csv(
        calibration_table(y_true, scorers["model"], n_bins=settings.calibration_bins).round(6),
        paths.plots / "calibration.csv",
    )
    with mlflow.start_run(run_id=info["run_id"]):
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics["model"].items()})
        mlflow.set_tag("gate_decision", "promoted" if gate_report["promoted"] else "kept")
        mlflow.log_dict(gate_report, "gate.json")
        mlflow.log_artifact(str(paths.metrics))
    return EvaluateSummary(metrics=metrics, promoted=gate_report["promoted"])


def _gate(
    name: str,
    version: str,
    challenger: dict[str, float],
    test: pd.DataFrame,
    y_true: np.ndarray,
    spec: dict[str, Any],
    settings: EvaluateSettings,
    gate: GateSettings,
) -> dict[str, Any]:
    """Score the champion on the same test snapshot, decide, and move the alias if allowed.

    A champion built to another contract (horizon, feature definitions) is neither compared
    nor replaced: its probabilities answer another question, and scoring jobs built to it
    would stop. Moving production to the new contract is a decision: ``churn promote``.
    """
    current = version_by_alias(name, CHAMPION)
    champion, notes, replaceable = None, [], True
    if current is not None and str(current.version) != version:
        try:
            incumbent = load_model(f"models:/{name}@{CHAMPION}")
        except ModelError as exc:
            # A champion that cannot be loaded cannot be compared: only the challenger's
            # own checks decide, and the report says why.
            notes.append(f"champion {current.version} not compared: {exc}")
        else:
            problems = incumbent.contract_problems(
                feature_hash=spec["feature_hash"],
                horizon_days=spec["horizon_days"],
                columns=list(test.columns),
            )
            if problems:
                replaceable = False
                notes.append(
                    f"champion {current.version} was built to another contract "
                    f"({'; '.join(problems)}): kept; `churn promote {version}` makes this "
                    "model champion"
                )
            else:
                scores = {"c": incumbent.predict_proba(test)}
                champion = evaluation(y_true, scores, settings)["c"]
    promoted, reasons = gate_decision(challenger, champion, gate) if replaceable else (False, [])
    reasons = notes + reasons
    if promoted:
        promote(name, version)
    return {
        "promoted": promoted,
        "reasons": reasons,
        "challenger": {"version": version, **challenger},
        "champion": None
        if current is None or str(current.version) == version
        else {"version": str(current.version), **(champion or {})},
        "gate": {"max_auc_drop": gate.max_auc_drop, "max_ece": gate.max_ece},
    }
