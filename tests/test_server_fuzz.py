"""The server's own OpenAPI schema, fuzzed by schemathesis: whatever the request, never a 5xx.

A bounded number of cases per operation, against the tiny model (the HTTP layer is what is under test), with
limits small enough that a valid generated request stays cheap.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from server_helpers import ThreadServer, tiny_chat_model

from streamllm import StreamConfig
from streamllm.server import ServerConfig, create_app

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def fuzz_server():
    model, tokenizer = tiny_chat_model()
    config = ServerConfig(
        model_id="tiny",
        stream=StreamConfig(num_sinks=4, window=28, chunk_size=64),
        api_keys=(KEY,),
        max_sessions=4,
        max_body_bytes=4096,
        max_tokens_limit=2,
        max_message_chars=512,
        request_timeout_s=60,
    )
    with ThreadServer(create_app(model, tokenizer, config)) as server:
        yield server


OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/v1/sessions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/sessions/{session_id}"),
    ("DELETE", "/v1/sessions/{session_id}"),
]


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", headers=AUTH)


def test_every_operation_is_fuzzed(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


# Valid inputs for every operation; invalid ones where the schema constrains something (the request bodies).
CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or method == "POST"
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_input_makes_the_server_fail(api_schema, fuzz_server, method, path, mode):
    operation = api_schema[path][method]
    statuses = []

    @given(case=operation.as_strategy(generation_mode=mode), served=st.booleans(), no_session=st.booleans())
    @settings(
        max_examples=40 if method == "POST" else 15,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def fuzz(case, served, no_session):
        # Steer half the cases past the model check (and the session lookup) into generation itself.
        if served and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny"
        if served and case.path_parameters and "model" in case.path_parameters:
            case.path_parameters["model"] = "tiny"
        if no_session and case.headers:
            case.headers.pop("X-Session-Id", None)
        response = case.call_and_validate(
            base_url=fuzz_server.url, headers=AUTH, checks=[not_a_server_error], timeout=60
        )
        statuses.append(response.status_code)

    fuzz()
    print(method, path, mode.value, sorted(statuses))
