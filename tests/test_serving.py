"""The registered model behind MLflow's scoring server, as `mlflow models serve -m models:/NAME@champion` runs it.

The pyfunc is logged by register's own `_log_model` into a real SQLite registry, loaded back by registry URI, and
asked through `mlflow.pyfunc.scoring_server.init`: the FastAPI app that `mlflow models serve` runs under uvicorn,
called here in process through starlette's TestClient (no port, no subprocess; the HTTP handling is MLflow's).
"""
from __future__ import annotations

import warnings

import mlflow
import pytest

from tests.conftest import register_tiny, temporary_mlflow_store


@pytest.fixture(scope="module")
def scoring(trained, tmp_path_factory):
    from mlflow.exceptions import MlflowException
    from mlflow.models.utils import load_serving_example
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    with temporary_mlflow_store(tmp_path_factory.mktemp("mlflow")) as (_, experiment):
        version = register_tiny(trained, experiment)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = mlflow.pyfunc.load_model(f"models:/tiny/{version}")
        try:
            example = load_serving_example(f"models:/tiny/{version}")
        except (MlflowException, OSError):  # none logged: the test that asks for it fails, not the fixture
            example = None
    with TestClient(scoring_server.init(model)) as client:
        client.load_warnings = [str(w.message) for w in caught]
        client.serving_example = example
        yield client


def test_loading_the_model_warns_of_nothing(scoring):
    """MLflow warned "Add type hints to the `predict` method" at every load and serve of every version."""
    assert not [w for w in scoring.load_warnings if "type hint" in w]


def test_the_serving_example_mlflow_shows_is_one_the_server_answers(scoring):
    """register logs an input example, so the MLflow UI shows a request to copy (serving_input_example.json) and
    MLflow stopped warning "An input example was not provided" at every register."""
    assert scoring.serving_example, "no serving_input_example.json logged with the model"
    response = scoring.post("/invocations", content=scoring.serving_example,
                            headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    [text] = response.json()["predictions"]
    assert text.lower().startswith("once upon a time")


def invoke(client, prompts, **params):
    response = client.post("/invocations", json={"inputs": {"prompt": prompts}, "params": params})
    return response.status_code, response.json()


def test_the_served_model_continues_each_prompt_with_the_params_it_is_given(scoring):
    status, body = invoke(scoring, ["once upon a time", "the dog"], max_new_tokens=4, temperature=0.0)
    assert status == 200
    texts = body["predictions"]
    assert len(texts) == 2 and texts[0].startswith("once upon a time") and texts[1].startswith("the dog")
    assert invoke(scoring, ["the dog"], max_new_tokens=4, temperature=0.0)[1]["predictions"] == texts[1:]


@pytest.mark.parametrize(("param", "value", "says"), [
    ("temperature", -1.0, "temperature needs a number >= 0, not -1.0"),
    ("top_p", 0.0, "top_p needs a number in (0, 1], not 0.0"),
    ("top_p", 1.5, "top_p needs a number in (0, 1], not 1.5"),
    ("top_k", -3, "top_k needs a number >= 0, not -3"),
    ("max_new_tokens", 0, "max_new_tokens needs a number >= 1, not 0"),
    ("seed", 2**70, f"seed needs a number in [{-2**63}, {2**64 - 1}], not {2**70}"),  # torch.manual_seed's range
])
def test_a_sampling_param_the_command_line_refuses_is_a_400_naming_it(scoring, param, value, says):
    """A negative temperature used to sample from the inverted distribution (garbage, status 200); the served model
    now refuses what `scriptorium generate` refuses, with MLflow's INVALID_PARAMETER_VALUE."""
    status, body = invoke(scoring, ["once upon a time"], **{param: value})
    assert status == 400
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert says in body["message"]


def test_a_null_prompt_is_a_400_naming_its_row_not_the_text_none(scoring):
    """`str(None)` used to make "None" the prompt, generated from with status 200. In the `dataframe_records` and
    `dataframe_split` forms a null reaches the model as NaN and is refused here; in the `inputs` form MLflow's own
    parser (`parse_tf_serving_input`) has already made it the string 'None', which no model can tell from a prompt."""
    for body in ({"dataframe_records": [{"prompt": "the dog"}, {"prompt": None}]},
                 {"dataframe_split": {"columns": ["prompt"], "data": [["the dog"], [None]]}}):
        response = scoring.post("/invocations", json=body)
        assert response.status_code == 400
        assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "prompt 2 of 2 is null" in response.json()["message"]
