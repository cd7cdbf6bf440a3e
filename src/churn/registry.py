"""Model registry moves: the ``champion`` and ``challenger`` aliases and their history.

Promotion records the outgoing champion in the registered model's ``previous_champion`` tag,
so :func:`rollback` can move the alias back one step.
"""

from __future__ import annotations

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from churn import ChurnError

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous_champion"


class RegistryError(ChurnError):
    """A registry move asked for something the registry does not hold."""


def version_by_alias(name: str, alias: str) -> ModelVersion | None:
    """The version behind ``name@alias``, or ``None`` when the alias is not set."""
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(name: str, version: str) -> str | None:
    """Point ``champion`` at ``version``; return the version it pointed at before."""
    client = mlflow.MlflowClient()
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"model '{name}' has no version {version}") from None
    previous = version_by_alias(name, CHAMPION)
    old = None if previous is None else str(previous.version)
    if old is not None and old != str(version):
        client.set_registered_model_tag(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return old


def rollback(name: str) -> str:
    """Move ``champion`` back to the version it replaced; return that version."""
    client = mlflow.MlflowClient()
    try:
        previous = client.get_registered_model(name).tags.get(PREVIOUS)
    except MlflowException:
        raise RegistryError(f"no registered model '{name}'") from None
    if previous is None:
        raise RegistryError(f"model '{name}' has no earlier champion to roll back to")
    current = version_by_alias(name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, previous)
    if current is not None:
        client.set_registered_model_tag(name, PREVIOUS, str(current.version))
    return previous
