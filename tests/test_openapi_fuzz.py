"""Schemathesis against a live `retrieval serve` process: no server errors, no schema violations.

Bounded: a fixed number of generated examples per operation, derandomised so CI is repeatable.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from conftest import make_archive, tiny_settings
from hypothesis import HealthCheck, given, settings
from live_server import running_server, tiny_env
from schemathesis import checks

from retrieval.ingest.pipeline import IngestPipeline
from retrieval.service import SpaceService

EXAMPLES_PER_OPERATION = 60
#: no 5xx, and every response (status, content type, headers, body) as the OpenAPI document says
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    root = tmp_path_factory.mktemp("fuzz")
    make_archive(root / "roots" / "archive", studies=2, per_study=2)
    service = SpaceService(tiny_settings(root / "data"))
    IngestPipeline(service).run(root / "roots" / "archive")
    service.close()
    env = tiny_env(root / "data", RETRIEVAL_INGEST_ROOTS=str(root / "roots"))
    with running_server(env, root / "serve.log") as base:
        yield schemathesis.openapi.from_url(f"{base}/openapi.json")
    server_log = (root / "serve.log").read_text()
    assert "Traceback" not in server_log, server_log[-4000:]


def test_no_server_errors_and_responses_match_the_schema(api_schema: schemathesis.BaseSchema) -> None:
    """Every operation, ``EXAMPLES_PER_OPERATION`` generated requests each, all default checks.

    (Driven by hand rather than through ``schemathesis.pytest``, whose fixture loader does not
    run under pytest 9.)
    """
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 13
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def exercise(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS, timeout=60)

        try:
            exercise()
        except (Exception, BaseExceptionGroup) as exc:  # collect every operation's failure, report them together
            failures[operation.label] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
