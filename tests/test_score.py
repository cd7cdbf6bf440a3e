from __future__ import annotations

import numpy as np
import pandas as pd

from churn.score import risk_deciles, risk_tiers, top_reasons


def test_deciles_split_twenty_customers_two_per_decile():
    probability = np.linspace(0.0, 0.95, 20)
    deciles = risk_deciles(probability)
    assert deciles[-1] == 1
    assert deciles[-2] == 1
    assert deciles[0] == 10
    assert np.bincount(deciles)[1:].tolist() == [2] * 10


def test_tiers_use_highest_threshold_reached():
    tiers = risk_tiers(np.array([0.7, 0.69, 0.4, 0.39]), {"medium": 0.4, "high": 0.7})
    assert tiers.tolist() == ["high", "medium", "medium", "low"]


def test_top_reasons_take_positive_contributions_in_order():
    contributions = pd.DataFrame(
        {"recency_days": [0.9, -0.2], "frequency": [0.1, -0.1], "spend_90d": [0.5, -0.3]}
    )
    values = pd.DataFrame({"recency_days": [143, 2], "frequency": [1, 9], "spend_90d": [0.0, 12.5]})
    reasons = top_reasons(contributions, values, n=2)
    assert reasons.tolist() == ["recency_days=143; spend_90d=0", ""]
