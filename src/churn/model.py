"""The churn model artifact: a LightGBM booster plus isotonic calibration, as an MLflow pyfunc.

Train writes it, evaluate and score load it: from ``models/`` inside the pipeline, or from the
registry (``models:/churn@champion``) in batch jobs. ``predict`` returns calibrated churn
probabilities; :meth:`ChurnModel.contributions` gives per-feature log-odds contributions
(LightGBM's TreeSHAP once per split pattern, :func:`treeshap`; or the path attribution of
:func:`path_table`).
Large batches run through the booster compiled to machine code (:func:`compile_booster`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightgbm as lgb
import lleaves
import llvmlite
import llvmlite.binding as llvm
import mlflow
import numpy as np
import pandas as pd
from scipy import sparse, special

from churn import ChurnError
from churn.config import ATTRIBUTIONS


class ModelError(ChurnError):
    """The model cannot be loaded, or the data do not fit its input contract."""

    exit_code = 3


class ModelNotFoundError(ModelError):
    """No model at the directory or URI given: bad input (exit code 2), not a contract."""

    exit_code = 2


@dataclass(frozen=True)
class ModelCard:
    """What a model was trained on, how its scores are calibrated, and what it expects.

    ``reference`` holds drift profiles (see :mod:`churn.drift`), on the validation snapshot,
    of the churn probability and of every feature with a value in the training snapshots.
    The score that is calibrated is ``blend_weight`` x the booster's probability + the rest
    x the BTYD churn probability in ``blend_column`` (none: the booster alone).
    ``season_prior`` is the validation snapshot's :func:`churn.features.season_prior`:
    calibrated probabilities are moved from that season to each scored row's (see
    :func:`shift_season`).
    """

    features: list[str]
    horizon_days: int
    feature_hash: str
    train_cutoffs: list[str]
    validation_cutoff: str
    best_iteration: int
    calibration_x: list[float]
    calibration_y: list[float]
    reference: dict[str, dict[str, list[float]]]
    blend_column: str | None = None
    blend_weight: float = 1.0
    season_prior: float | None = None


def contract_problems(
    card: ModelCard, *, feature_hash: str, horizon_days: int, columns: list[str]
) -> list[str]:
    """What differs between a model's contract and the snapshot it is asked to score."""
    problems = []
    if card.horizon_days != horizon_days:
        problems.append(f"horizon: model {card.horizon_days} days, params {horizon_days} days")
    if card.feature_hash != feature_hash:
        problems.append(
            f"feature definitions: model {card.feature_hash}, "
            f"current {feature_hash} (features.py or windows/lookback changed)"
        )
    missing = [f for f in card.features if f not in columns]
    if missing:
        problems.append(f"features missing from the snapshot: {missing}")
    return problems


TIE_BREAK = 1e-6  # keeps the raw order inside isotonic plateaus: calibration must not tie


def calibrate(raw: np.ndarray, x: list[float], y: list[float]) -> np.ndarray:
    """Map raw scores (in [0, 1]) through an isotonic step function given by its thresholds,
    plus ``TIE_BREAK`` x the raw score so that customers the raw score ranks stay ranked.

    >>> calibrate(np.array([0.0, 0.25, 1.0]), [0.1, 0.5], [0.2, 0.6]).round(6).tolist()
    [0.2, 0.35, 0.600001]
    """
    return np.clip(np.interp(raw, x, y) + TIE_BREAK * raw, 0, 1)


def shift_season(p: np.ndarray, prior: np.ndarray, reference: float | None) -> np.ndarray:
    """Move probabilities calibrated where the base rate a year earlier was ``reference`` to
    rows whose base rate a year earlier was ``prior``: the log-odds shift by the difference
    of the two priors' log-odds (a label-shift correction); rows without a prior keep theirs.

    >>> shift_season(np.array([0.5, 0.5]), np.array([0.4, np.nan]), 0.5).round(4).tolist()
    [0.4, 0.5]
    """
    if reference is None:
        return p
    shift = np.nan_to_num(special.logit(prior) - special.logit(reference))
    return special.expit(special.logit(np.clip(p, 1e-6, 1 - 1e-6)) + shift)


def blend(booster_p: np.ndarray, btyd_p: np.ndarray | None, weight: float) -> np.ndarray:
    """``weight`` x the booster's probability + the rest x the BTYD one; where the BTYD
    probability is missing the booster's stands alone.

    >>> blend(np.array([0.2, 0.6]), np.array([0.4, np.nan]), 0.25).round(6).tolist()
    [0.35, 0.6]
    """
    if btyd_p is None or weight >= 1:
        return booster_p
    return np.where(np.isnan(btyd_p), booster_p, weight * booster_p + (1 - weight) * btyd_p)


def compile_booster(booster_file: Path, cache: Path | None = None) -> lleaves.Model:
    """The booster in ``booster_file`` compiled to machine code for this CPU (lleaves: the same
    predictions as LightGBM's, several times faster). The object code is cached in ``cache``
    (default ``<system temp>/churn-compiled``) under a digest of the model text, the compiler
    versions and the CPU, so only the first load of a model on a machine compiles it."""
    cpu = f"{llvm.get_host_cpu_name()} {llvm.get_host_cpu_features().flatten()}"
    digest = hashlib.sha256(booster_file.read_bytes())
    digest.update(f"{version('lleaves')} {llvmlite.__version__} {cpu}".encode())
    folder = cache or Path(tempfile.gettempdir()) / "churn-compiled"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{digest.hexdigest()[:32]}.o"
    compiled = lleaves.Model(model_file=str(booster_file))
    if target.exists():
        compiled.compile(cache=str(target))
    else:  # compile beside the target, then rename: a concurrent load never reads half a file
        staging = target.with_name(f".{target.stem}.{os.getpid()}.o")
        compiled.compile(cache=str(staging))
        staging.replace(target)
    return compiled


def _leaf_paths(node: dict[str, Any]) -> tuple[float, float, list[tuple[int, list]]]:
    """A dumped LightGBM (sub)tree's expected value and training count, and each of its
    leaves with the (split feature, change in expected value) steps that lead to it."""
    if "split_feature" not in node:
        return node["leaf_value"], node.get("leaf_count", 1), [(node.get("leaf_index", 0), [])]
    left, right = _leaf_paths(node["left_child"]), _leaf_paths(node["right_child"])
    count = left[1] + right[1]
    value = (left[0] * left[1] + right[0] * right[1]) / count if count else 0.0
    feature = node["split_feature"]
    leaves = [
        (leaf, [(feature, side[0] - value), *steps])
        for side in (left, right)
        for leaf, steps in side[2]
    ]
    return value, count, leaves


def path_table(
    trees: list[dict[str, Any]], n_features: int
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Path attribution (Saabas; XGBoost's ``approx_contribs``) of a dumped LightGBM model.

    Row ``first[t] + leaf`` of the table holds, per feature, the changes in tree ``t``'s
    expected value (leaf values weighted by training counts, as TreeSHAP weighs them) at the
    splits on that feature on the way to the leaf. A row's contributions are the sum of its
    leaves' rows: they add up to its raw score minus the trees' expected values, as
    TreeSHAP's do, at the cost of a leaf lookup instead of TreeSHAP's sum over feature subsets.
    """
    rows: list[int] = []
    columns: list[int] = []
    steps: list[float] = []
    first = np.zeros(len(trees), dtype=np.int64)
    total = 0
    for t, tree in enumerate(trees):
        first[t] = total
        for leaf, path in _leaf_paths(tree["tree_structure"])[2]:
            for feature, step in path:
                rows.append(total + leaf)
                columns.append(feature)
                steps.append(step)
        total += tree["num_leaves"]
    # repeated splits on one feature along a path add up (coo -> csr sums duplicates)
    table = sparse.coo_matrix((steps, (rows, columns)), shape=(total, n_features)).tocsr()
    return table, first


PATH_ROWS = 16_384  # rows whose leaf indices and path contributions are held at once


def path_contributions(
    table: sparse.csr_matrix, first: np.ndarray, leaves: np.ndarray
) -> np.ndarray:
    """Per-row, per-feature path contributions from each row's leaf index in every tree."""
    n, trees = leaves.shape
    hits = sparse.csr_matrix(
        (np.ones(n * trees), (leaves + first).ravel(), np.arange(0, n * trees + 1, trees)),
        shape=(n, table.shape[0]),
    )
    return (hits @ table).toarray()


ZERO_BAND = float(np.float32(1e-35))  # LightGBM's kZeroThreshold: a float literal widened
DENSE_PATTERNS = 1 << 20  # codes below this index a table; above it they are sorted
PATTERN_MIN_ROWS = 1_000  # below this, a LightGBM call per tree costs more than it saves


# LightGBM's predict records which trees to use on the booster itself: two threads
# predicting different trees of one booster at once would mix them up.
_PREDICTING = threading.Lock()


def booster_predict(booster: lgb.Booster, matrix: np.ndarray, **kwargs: Any) -> np.ndarray:
    """``booster.predict(matrix, **kwargs)``, one call at a time: safe from several threads."""
    with _PREDICTING:
        return booster.predict(matrix, **kwargs)


def _goes_left(value: float, split: dict[str, Any]) -> bool:
    """Whether ``value`` goes left at a dumped numerical split, as LightGBM decides: it
    reads values within its zero band as 0, and NaN as 0 unless the split has a NaN branch."""
    missing = split["missing_type"]
    if -ZERO_BAND <= value <= ZERO_BAND or (math.isnan(value) and missing != "NaN"):
        value = 0.0
    if (missing == "Zero" and value == 0.0) or (missing == "NaN" and math.isnan(value)):
        return bool(split["default_left"])
    return value <= split["threshold"]


def _splits(node: dict[str, Any]) -> list[dict[str, Any]]:
    """A dumped (sub)tree's split nodes."""
    if "split_feature" not in node:
        return []
    return [node, *_splits(node["left_child"]), *_splits(node["right_child"])]


@dataclass(frozen=True)
class SplitPatterns:
    """Which way a row goes at every split of each tree, as lookups by feature cell.

    ``edges[j]`` are feature j's cell bounds: every threshold a tree compares it with, and
    LightGBM's zero band. A value's cell is the number of edges below it (NaN's is
    ``len(edges[j]) + 1``), so all values of a cell go the same way at every split.
    ``trees[t]`` pairs each feature tree t splits on with ``bits``: ``bits[cell]`` has bit
    k set when the cell goes left at the tree's k-th split. None marks a tree whose rows are
    not grouped (a categorical split, or more than 63 splits).
    """

    edges: list[np.ndarray]
    trees: list[list[tuple[int, np.ndarray]] | None]


def split_patterns(trees: list[dict[str, Any]], n_features: int) -> SplitPatterns:
    """The :class:`SplitPatterns` of a dumped LightGBM model (``dump_model()["tree_info"]``)."""
    splits = [_splits(tree["tree_structure"]) for tree in trees]
    bounds = [{float(np.nextafter(-ZERO_BAND, -np.inf)), ZERO_BAND} for _ in range(n_features)]
    for split in (s for tree in splits for s in tree if s["decision_type"] == "<="):
        bounds[split["split_feature"]].add(float(split["threshold"]))
    edges = [np.array(sorted(b)) for b in bounds]
    # a cell's upper edge stands for all its values; then above every edge, and NaN
    cell_values = [[*e.tolist(), math.inf, math.nan] for e in edges]
    coded: list[list[tuple[int, np.ndarray]] | None] = []
    for tree in splits:
        if len(tree) > 63 or any(s["decision_type"] != "<=" for s in tree):
            coded.append(None)
            continue
        bits: dict[int, np.ndarray] = {}
        for k, split in enumerate(tree):
            j = split["split_feature"]
            left = np.array([_goes_left(v, split) for v in cell_values[j]], dtype=np.int64)
            bits[j] = bits.get(j, np.zeros_like(left)) | (left << k)
        coded.append(list(bits.items()))
    return SplitPatterns(edges, coded)


def feature_cells(matrix: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """Each value's cell (see :class:`SplitPatterns`), one row per feature."""
    cells = np.empty((len(edges), len(matrix)), dtype=np.intp)
    for j, bounds in enumerate(edges):
        column = matrix[:, j]
        cells[j] = np.searchsorted(bounds, column)
        cells[j][np.isnan(column)] = len(bounds) + 1
    return cells


def pattern_codes(tree: list[tuple[int, np.ndarray]], cells: np.ndarray) -> np.ndarray:
    """Each row's split pattern in one tree, as an integer: bit k set when it goes left at
    the k-th split."""
    codes = np.zeros(cells.shape[1], dtype=np.int64)
    for feature, bits in tree:
        codes |= bits.take(cells[feature])
    return codes


def _pattern_groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A row standing for each distinct code, and each row's group (its code's position)."""
    size = int(codes.max()) + 1
    if size > DENSE_PATTERNS:
        _, stand_ins, group = np.unique(codes, return_index=True, return_inverse=True)
        return stand_ins, group
    last = np.full(size, -1, dtype=np.intp)
    last[codes] = np.arange(len(codes))
    present = np.flatnonzero(last >= 0)
    position = np.zeros(size, dtype=np.intp)
    position[present] = np.arange(len(present))
    return last[present], position.take(codes)


def treeshap(booster: lgb.Booster, patterns: SplitPatterns, matrix: np.ndarray) -> np.ndarray:
    """LightGBM's TreeSHAP contributions (rows x features, without the expected value) of
    the trees in ``patterns``, computed once per split pattern instead of once per row.

    A tree's TreeSHAP values depend on a row only through the way it goes at each of the
    tree's splits: the row's branch is followed, the other weighed by its training count.
    At 15 leaves a tree sees several hundred patterns in 100,000 customers. Fewer than
    ``PATTERN_MIN_ROWS`` rows go to LightGBM in one call.
    """
    n, n_features = matrix.shape
    if n == 0:
        return np.zeros((0, n_features))
    if n < PATTERN_MIN_ROWS:
        trees = len(patterns.trees)
        return booster_predict(booster, matrix, pred_contrib=True, num_iteration=trees)[:, :-1]
    total = np.zeros((n_features, n))
    cells = feature_cells(matrix, patterns.edges)
    everyone = np.arange(n)
    for t, tree in enumerate(patterns.trees):
        if tree is None:
            stand_ins, group, features = everyone, everyone, range(n_features)
        else:
            stand_ins, group = _pattern_groups(pattern_codes(tree, cells))
            features = [feature for feature, _ in tree]
        # A few hundred stand-ins take one thread (batches are explained side by side);
        # every row of an ungrouped tree takes OpenMP's default.
        phi = booster_predict(
            booster,
            matrix[stand_ins],
            pred_contrib=True,
            start_iteration=t,
            num_iteration=1,
            num_threads=0 if tree is None else 1,
        )
        for feature in features:
            total[feature] += phi[:, feature].take(group)
    return total.T


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the system has one (Linux),
    else every CPU (macOS, Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ChurnModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper; artifacts ``booster`` (LightGBM text) and ``card`` (JSON).

    Batches of at least ``compiled_min_rows`` rows are predicted by the compiled booster;
    smaller ones by LightGBM, which costs nothing to prepare.
    """

    compiled_min_rows = 20_000

    def __init__(self) -> None:
        self.booster: lgb.Booster | None = None
        self.card: ModelCard | None = None
        self.booster_file: Path | None = None
        self._compiled: lleaves.Model | None = None
        self._path_table: tuple[sparse.csr_matrix, np.ndarray] | None = None
        self._patterns: SplitPatterns | None = None

    def load_context(self, context: Any) -> None:
        self.booster_file = Path(context.artifacts["booster"])
        self.booster = lgb.Booster(model_file=str(self.booster_file))
        self.card = ModelCard(**json.loads(Path(context.artifacts["card"]).read_text()))
        self._compiled = None
        self._path_table = None
        self._patterns = None

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> np.ndarray:
        return self.predict_proba(model_input)

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Churn probability of each row, in the season of the row's cutoff."""
        return self.in_season(self.validation_season_proba(frame), frame)

    def in_season(self, p: np.ndarray, frame: pd.DataFrame) -> np.ndarray:
        """Move validation-season probabilities ``p`` of ``frame``'s rows to their season."""
        if self._card.season_prior is None or "season_prior" not in frame:
            return p
        return shift_season(p, frame["season_prior"].to_numpy("float64"), self._card.season_prior)

    def validation_season_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Churn probability of each row as calibrated on the validation snapshot, before the
        move to the row's season: what drift checks compare with the validation profile."""
        card = self._card
        raw = self.booster_proba(self.matrix(frame))
        btyd_p = frame[card.blend_column].to_numpy("float64") if card.blend_column else None
        return calibrate(
            blend(raw, btyd_p, card.blend_weight), card.calibration_x, card.calibration_y
        )

    def booster_proba(self, matrix: np.ndarray) -> np.ndarray:
        """The booster's own probability for each row of the feature matrix."""
        if len(matrix) < self.compiled_min_rows or self.booster_file is None:
            return booster_predict(self._booster, matrix, num_iteration=self._card.best_iteration)
        if self._compiled is None:
            self._compiled = compile_booster(self.booster_file)
        return self._compiled.predict(matrix, n_jobs=usable_cpus())

    def contributions(self, frame: pd.DataFrame, method: str = "treeshap") -> pd.DataFrame:
        """Per-feature contributions to the raw log-odds, one column per feature: TreeSHAP
        (:func:`treeshap`), or ``path`` attribution (:func:`path_table`; the same sums)."""
        self.prepare_attribution(method)
        matrix, iterations = self.matrix(frame), self._card.best_iteration
        if method == "path":
            contrib = np.vstack(  # blocks keep the rows x trees leaf indices small
                [
                    path_contributions(
                        *self._paths(),
                        booster_predict(
                            self._booster, block, pred_leaf=True, num_iteration=iterations
                        ),
                    )
                    for block in np.array_split(matrix, max(1, -(-len(matrix) // PATH_ROWS)))
                ]
            )
        else:
            contrib = treeshap(self._booster, self._split_patterns(), matrix)
        return pd.DataFrame(contrib, columns=self._card.features, index=frame.index)

    def prepare_attribution(self, method: str) -> None:
        """Build the tables :meth:`contributions` reads for ``method`` (the trees' paths or
        split patterns) unless built already; call it once before threads share the model."""
        if method not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be one of {ATTRIBUTIONS}, got {method!r}")
        if method == "path":
            self._paths()
        else:
            self._split_patterns()

    def _paths(self) -> tuple[sparse.csr_matrix, np.ndarray]:
        if self._path_table is None:
            self._path_table = path_table(self._trees(), len(self._card.features))
        return self._path_table

    def _split_patterns(self) -> SplitPatterns:
        if self._patterns is None:
            self._patterns = split_patterns(self._trees(), len(self._card.features))
        return self._patterns

    def _trees(self) -> list[dict[str, Any]]:
        """The booster's trees up to the best iteration, as LightGBM dumps them."""
        return self._booster.dump_model(num_iteration=self._card.best_iteration)["tree_info"]

    @property
    def feature_names(self) -> list[str]:
        """The model's input columns, in training order."""
        return list(self._card.features)

    @property
    def reference(self) -> dict[str, dict[str, list[float]]]:
        """Drift profiles of the validation snapshot (features and ``churn_probability``)."""
        return self._card.reference

    def contract_problems(
        self, *, feature_hash: str, horizon_days: int, columns: list[str]
    ) -> list[str]:
        """Every difference between the model's contract and a snapshot's (none: it fits)."""
        return contract_problems(
            self._card, feature_hash=feature_hash, horizon_days=horizon_days, columns=columns
        )

    def check_contract(self, *, feature_hash: str, horizon_days: int, columns: list[str]) -> None:
        """Raise :class:`ModelError` naming every difference from the model's contract."""
        problems = self.contract_problems(
            feature_hash=feature_hash, horizon_days=horizon_days, columns=columns
        )
        if problems:
            raise ModelError(
                "the model does not fit this data: "
                + "; ".join(problems)
                + ". Retrain (dvc repro) or score with matching params."
            )

    def matrix(self, frame: pd.DataFrame) -> np.ndarray:
        """The feature matrix in training order; a missing feature is a contract breach."""
        missing = [f for f in self._card.features if f not in frame.columns]
        if missing:
            raise ModelError(f"the model needs feature(s) {missing} that the snapshot lacks")
        return frame[self._card.features].to_numpy(dtype="float64")

    @property
    def _booster(self) -> lgb.Booster:
        if self.booster is None:
            raise ModelError("model used before its artifacts were loaded")
        return self.booster

    @property
    def _card(self) -> ModelCard:
        if self.card is None:
            raise ModelError("model used before its artifacts were loaded")
        return self.card


def write_artifacts(booster: lgb.Booster, card: ModelCard, folder: Path) -> dict[str, str]:
    """Write the booster and its card into ``folder``; return the pyfunc artifact mapping."""
    folder.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(folder / "booster.txt"), num_iteration=card.best_iteration)
    (folder / "card.json").write_text(json.dumps(asdict(card), indent=2))
    return {"booster": str(folder / "booster.txt"), "card": str(folder / "card.json")}


def load_model(uri: str) -> ChurnModel:
    """Load a churn model from a local directory or an MLflow URI (``models:/churn@champion``)."""
    try:
        loaded = mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # MLflow raises several types; the user needs the URI and cause
        raise ModelNotFoundError(f"cannot load model '{uri}': {str(exc).splitlines()[0]}") from exc
    model = loaded.unwrap_python_model()
    if not isinstance(model, ChurnModel):
        raise ModelError(f"'{uri}' is not a churn model (got {type(model).__name__})")
    return model
