"""``python -m churn`` runs the command line."""

from churn.cli import main

main()
