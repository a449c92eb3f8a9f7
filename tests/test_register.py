"""The champion alias: it moves only for a better (or equal) score on the same test data and labels."""
from __future__ import annotations

import math

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

from camid.errors import CamidError
from camid.stages.register import alias_decision, champion

SAME = {"test_data": "abc123", "labels": "A,B"}


def candidate(score, **kw):
    return {"score": score, **SAME, **kw}


def holder(score, **kw):
    return {"version": "3", "score": score, **SAME, **kw}


@pytest.mark.parametrize("new, old, moves", [
    (0.80, 0.70, True),      # better
    (0.60, 0.70, False),     # worse
    (0.70, 0.70, True),      # tied: the newer model scored as well on the same photos
])
def test_scores_on_the_same_test_data_are_compared(new, old, moves):
    moved, why = alias_decision(candidate(new), holder(old))
    assert moved is moves and "same test data" in why


def test_a_first_model_becomes_champion():
    assert alias_decision(candidate(0.1), None) == (True, "no champion yet")


def test_a_nan_or_missing_score_never_wins():
    for bad in (math.nan, None):
        moved, why = alias_decision(candidate(bad), holder(0.1))
        assert not moved and "no valid test score" in why
        assert not alias_decision(candidate(bad), None)[0]


def test_a_champion_without_a_valid_score_is_replaced():
    assert alias_decision(candidate(0.5), holder(None))[0]
    assert alias_decision(candidate(0.5), holder(math.nan))[0]


def test_scores_on_other_test_data_or_labels_are_not_compared():
    moved, why = alias_decision(candidate(0.99), holder(0.1, test_data="other"))
    assert not moved and "other test data" in why and "--promote" in why
    moved, why = alias_decision(candidate(0.99), holder(0.1, test_data=None))  # an old version without the tag
    assert not moved and "other test data" in why
    moved, why = alias_decision(candidate(0.99), holder(0.1, labels="A,B,C"))
    assert not moved and "other cameras" in why


class _Client:
    """A stand-in tracking client that fails the way a real store does."""

    def __init__(self, error_code):
        self.error_code = error_code

    def get_registered_model(self, name):
        raise MlflowException("the store says no", error_code=self.error_code)


def test_no_registered_model_means_no_champion_but_a_store_error_is_an_error():
    assert champion(_Client(RESOURCE_DOES_NOT_EXIST), "camid", "champion") is None
    with pytest.raises(CamidError, match="cannot read the 'champion' alias"):
        champion(_Client(INTERNAL_ERROR), "camid", "champion")


def test_champion_reads_the_alias_holder_from_a_real_store(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("camid")
    assert champion(client, "camid", "champion") is None  # a model, but no alias yet
    version = client.create_model_version("camid", source=str(tmp_path))
    for key, value in {"weighted_accuracy": "0.75", "test_data": "abc123", "labels": "A,B"}.items():
        client.set_model_version_tag("camid", version.version, key, value)
    client.set_registered_model_alias("camid", "champion", version.version)
    assert champion(client, "camid", "champion") == {"version": str(version.version), "score": 0.75, **SAME}
