"""In-process tests of the sidecar HTTP API: every endpoint, auth case and bad input.

Each test gets a fresh app (so a fresh private CollectorRegistry and an in-memory store) and a
fake clock injected through ``create_app`` and a dependency override, never a patched global.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

import service.store
from service import Settings, create_app
from service.deps import get_clock, get_store
from service.store import WRITE_WAIT_S, Store

PROBLEM = "application/problem+json"
T0 = 1_700_000_000.0
TTL = 60.0


class FakeClock:
    """Unix seconds that only move when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def health(orth: float = 0.01, rot: float = 1.5) -> dict[str, float]:
    """A ``health()`` entry shaped like the optimizers' (plain floats)."""
    return {
        "orthogonality_error": orth,
        "update_rms": 0.2,
        "eigengap_ratio_L": 0.3,
        "eigengap_ratio_R": 0.4,
        "rotation_degrees_L_k1": rot,
        "rotation_degrees_L_k8": 2 * rot,
        "rotation_degrees_R_k1": 0.5,
        "rotation_degrees_R_k8": 0.75,
        "basis_staleness_L": 3.0,
        "nonfinite_skips": 2.0,
    }


def snapshot(
    step: int = 1,
    rank: int = 0,
    names: tuple[str, ...] = ("layers.0.attn.q.weight",),
    run_id: str = "run-a",
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema_version": 1,
        "run_id": run_id,
        "rank": rank,
        "step": step,
        "wall_time": T0,
        "params": {name: health(rot=float(step)) for name in names},
    }
    body.update(extra)
    return body


OPTIMIZER = {
    "class_name": "SOAP",
    "groups": [
        {
            "hyperparameters": {"lr": 3e-3, "betas": [0.9, 0.95], "nesterov": False},
            "params": ["layers.0.attn.q.weight"],
        }
    ],
    "state": {
        "layers.0.attn.q.weight": {
            "shape": [64, 32],
            "owner_rank": 0,
            "buffer_norms": {"exp_avg": 0.5, "exp_avg_sq": None},
            "eigenvalues": {"L": [4.0, 1.0], "R": [2.0, 1.5]},
        }
    },
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def token() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def client(token: str, clock: FakeClock) -> Iterator[TestClient]:
    settings = Settings(token=token, db_path=":memory:", series_ttl_s=TTL, max_body_bytes=64_000)
    app = create_app(settings, clock=clock)
    app.dependency_overrides[get_clock] = lambda: clock
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {token}"
        yield c


def post(client: TestClient, body: Any) -> Any:
    return client.post("/v1/snapshots", json=body)


def metric_lines(client: TestClient) -> list[str]:
    return [ln for ln in client.get("/metrics").text.splitlines() if not ln.startswith("#")]


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    return body


# ------------------------------------------------------------------------------ probes


def test_healthz_is_open_and_ok(client: TestClient) -> None:
    r = client.get("/healthz", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    # HEAD as GET, without a body (it was a 405)
    r = client.head("/healthz", headers={"Authorization": ""})
    assert r.status_code == 200 and r.content == b""


def test_readyz_is_503_until_the_first_snapshot(client: TestClient) -> None:
    body = assert_problem(client.get("/readyz"), 503)
    assert body["type"].endswith("not-ready")
    assert client.head("/readyz").status_code == 503
    assert post(client, snapshot()).status_code == 201
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.head("/readyz").status_code == 200


def test_metrics_is_served_directly_without_auth_or_redirect(client: TestClient) -> None:
    post(client, snapshot())
    r = client.get("/metrics", headers={"Authorization": ""}, follow_redirects=False)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    # HEAD as GET, its headers without the body (it was a 405)
    head = client.head("/metrics", headers={"Authorization": ""})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == r.headers["content-type"]
    assert int(head.headers["content-length"]) == len(r.content)


# ------------------------------------------------------------------------------ auth


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (None, None),
        ("Bearer wrong-token-wrong-token", "invalid_token"),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/snapshots"),
        ("GET", "/v1/optimizer"),
        ("GET", "/v1/params"),
        ("GET", "/v1/params/x.y"),
        ("GET", "/v1/params/x.y/history"),
    ],
)
def test_v1_requires_the_bearer_token(
    client: TestClient, method: str, path: str, header: str | None, error: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    if header is None:
        del client.headers["Authorization"]
    r = client.request(method, path, headers=headers, json=snapshot())
    assert_problem(r, 401)
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    assert (error in challenge) if error else "error=" not in challenge
    assert not client.app.state.store.ready  # type: ignore[attr-defined]


def _asgi_post_without_reading(app: Any, authorization: bytes | None) -> tuple[int, bool]:
    """POST a malformed body within the size limit straight to the ASGI app; (status, whether
    the app asked for the body). TestClient sends the whole body up front, so it cannot tell."""
    content = b"{" * 1000
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(content)).encode())]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/snapshots", "raw_path": b"/v1/snapshots",
             "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 9400)}  # fmt: skip
    read, sent = [], []

    async def receive() -> dict[str, Any]:
        read.append(True)
        return {"type": "http.request", "body": content, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], bool(read)


def test_the_token_is_checked_before_the_body_is_read(client: TestClient) -> None:
    # Without this order a client with no token makes the sidecar read and parse up to
    # max_body_bytes, and learns from a 400/422 what was wrong with its body.
    app = client.app
    for authorization in (None, b"Bearer wrong-token-wrong-token", b"Basic dXNlcjpwYXNz"):
        assert _asgi_post_without_reading(app, authorization) == (401, False)
    del client.headers["Authorization"]
    for content in (b"{not json", b"\xff\xfe", json.dumps(snapshot() | {"step": "x"}).encode()):
        r = client.post("/v1/snapshots", content=content,
                        headers={"Content-Type": "application/json"})
        body = assert_problem(r, 401)  # not 400 malformed-json, not 422
        assert body["type"] == "urn:orthoshard:problem:unauthorized"
        assert body["instance"] == "/v1/snapshots"
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/healthz").status_code == 200  # the probes stay open
    assert client.get("/metrics").status_code == 200


def test_the_right_token_is_accepted(client: TestClient) -> None:
    assert post(client, snapshot()).status_code == 201
    assert client.get("/v1/optimizer").status_code == 200


# ------------------------------------------------------------------------------ ingest


def test_ingest_stores_metrics_state_and_configuration(client: TestClient) -> None:
    r = post(client, snapshot(step=7, optimizer=OPTIMIZER))
    assert r.status_code == 201
    assert r.json() == {"run_id": "run-a", "rank": 0, "step": 7, "params_stored": 1}
    detail = client.get("/v1/params/layers.0.attn.q.weight").json()
    assert detail["metrics"] == health(rot=7.0)
    assert detail["state"]["shape"] == [64, 32] and detail["state"]["owner_rank"] == 0
    assert detail["state"]["buffer_norms"] == {"exp_avg": 0.5, "exp_avg_sq": None}
    assert detail["state"]["eigenvalues"] == {"L": [4.0, 1.0], "R": [2.0, 1.5]}
    ranks = client.get("/v1/optimizer").json()["ranks"]
    assert [(r["rank"], r["step"], r["snapshots_received"]) for r in ranks] == [(0, 7, 1)]
    assert ranks[0]["optimizer"]["groups"][0]["hyperparameters"]["betas"] == [0.9, 0.95]
    # the configuration only: the state summaries are the parameters' (an always empty
    # "state" here read as a rank without optimizer state)
    assert set(ranks[0]["optimizer"]) == {"class_name", "groups"}


def test_state_summary_survives_a_snapshot_without_one(client: TestClient) -> None:
    post(client, snapshot(step=1, optimizer=OPTIMIZER))
    post(client, snapshot(step=2))
    detail = client.get("/v1/params/layers.0.attn.q.weight").json()
    assert detail["step"] == 2 and detail["state"]["shape"] == [64, 32]
    assert client.get("/v1/optimizer").json()["ranks"][0]["optimizer"]["class_name"] == "SOAP"


def test_a_new_run_does_not_inherit_the_previous_runs_summary(client: TestClient) -> None:
    post(client, snapshot(step=9, optimizer=OPTIMIZER))  # a SOAP run with its summary
    post(client, snapshot(step=0, run_id="run-b"))  # a new run, no summary yet
    detail = client.get("/v1/params/layers.0.attn.q.weight").json()
    assert detail["run_id"] == "run-b" and detail["state"] is None
    (rank,) = client.get("/v1/optimizer").json()["ranks"]
    assert rank["run_id"] == "run-b" and rank["optimizer"] is None


def test_a_summary_is_kept_only_for_its_rank_and_later_steps(client: TestClient) -> None:
    # the same run resumed at fewer ranks: rank 0 now owns the matrix rank 1 summarized, and
    # showed rank 1's norms and owner until its own next summary; resumed from a checkpoint,
    # a rank showed the summary of steps the run had discarded
    name = "layers.0.attn.q.weight"
    post(client, snapshot(step=10, rank=1, optimizer=OPTIMIZER))
    post(client, snapshot(step=11, rank=0))
    detail = client.get(f"/v1/params/{name}").json()
    assert (detail["rank"], detail["step"], detail["state"]) == (0, 11, None)
    post(client, snapshot(step=12, optimizer=OPTIMIZER))
    post(client, snapshot(step=13))  # the same rank, later: kept
    assert client.get(f"/v1/params/{name}").json()["state"]["shape"] == [64, 32]
    post(client, snapshot(step=11))  # the run went back to a checkpoint: not kept
    detail = client.get(f"/v1/params/{name}").json()
    assert (detail["step"], detail["state"]) == (11, None)


def raw_post(client: TestClient, content: bytes) -> Any:
    return client.post(
        "/v1/snapshots", content=content, headers={"Content-Type": "application/json"}
    )


BAD_BODIES = {
    "wrong type for step": snapshot() | {"step": "seven"},
    "negative rank": snapshot(rank=-1),
    "metric value is a string": snapshot() | {"params": {"w": {"orthogonality_error": "bad"}}},
    "unknown top-level field": snapshot(extra_field=1),
    "unknown field in state": snapshot(optimizer={"class_name": "M", "state": {"w": {"x": 1}}}),
    "params missing": {k: v for k, v in snapshot().items() if k != "params"},
    "slash in param name": snapshot(names=("a/b",)),
    "control character in param name": snapshot(names=("a\x00b",)),
    "escape sequence in param name": snapshot(names=("w\x1b[2J",)),
    "DEL in param name": snapshot(names=("w\x7f",)),
    "C1 control (CSI) in param name": snapshot(names=("w\x9b2J",)),
    "too many metrics": snapshot() | {"params": {"w": {f"m{i}": 1.0 for i in range(65)}}},
    "null step": snapshot() | {"step": None},
    "body is a list": [snapshot()],
    # exported as a counter: it went out as orthoshard_nonfinite_skips_total -3
    "negative skip count": snapshot() | {"params": {"w": {"nonfinite_skips": -3.0}}},
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_snapshot_is_422_and_nothing_is_stored(client: TestClient, case: str) -> None:
    body = assert_problem(post(client, BAD_BODIES[case]), 422)
    assert body["errors"] and all({"loc", "msg", "type"} <= set(e) for e in body["errors"])
    assert not client.app.state.store.ready  # type: ignore[attr-defined]


WRONG_JSON_TYPES = {
    "step as a string": snapshot() | {"step": "5"},
    "step as a float": snapshot() | {"step": 5.0},
    "step as a boolean": snapshot() | {"step": True},
    "rank as a boolean": snapshot() | {"rank": True},
    "wall time as a string": snapshot() | {"wall_time": "1700000000"},
    "metric as a string": snapshot() | {"params": {"w": {"orthogonality_error": "0.5"}}},
    "metric as a boolean": snapshot() | {"params": {"w": {"orthogonality_error": True}}},
    "run id as a number": snapshot() | {"run_id": 7},
    "shape as floats": snapshot(optimizer={"class_name": "M", "state": {"w": {"shape": [2.0]}}}),
    "owner rank as a boolean": snapshot(
        optimizer={"class_name": "M", "state": {"w": {"owner_rank": False}}}),
    "eigenvalue as a string": snapshot(
        optimizer={"class_name": "M", "state": {"w": {"eigenvalues": {"L": ["1.0"]}}}}),
}


@pytest.mark.parametrize("case", list(WRONG_JSON_TYPES))
def test_wrong_json_types_are_refused_not_coerced(client: TestClient, case: str) -> None:
    body = assert_problem(post(client, WRONG_JSON_TYPES[case]), 422)
    assert body["type"] == "urn:orthoshard:problem:validation-error"
    assert not client.app.state.store.ready  # type: ignore[attr-defined]


def test_a_json_integer_is_a_valid_float(client: TestClient) -> None:
    body = snapshot() | {"wall_time": 1_700_000_000, "params": {"w": {"nonfinite_skips": 0}}}
    assert post(client, body).status_code == 201
    assert client.get("/v1/params/w").json()["metrics"] == {"nonfinite_skips": 0.0}


@pytest.mark.parametrize("version", [0, 2, "1", None, True, 1.0])
def test_unknown_schema_version_is_refused(client: TestClient, version: Any) -> None:
    body = assert_problem(post(client, snapshot(schema_version=version)), 422)
    assert body["type"] == "urn:orthoshard:problem:unsupported-schema-version"
    assert not client.app.state.store.ready  # type: ignore[attr-defined]


@pytest.mark.parametrize("content", [
    b"{not json", b'{"schema_version": 1,', b"\xff\xfe",
    # json.loads raises other errors on these, which FastAPI answered as a bare 400
    b'{"schema_version": 1, "run_id": "r", "step": \xff}',   # not UTF-8
    b'{"schema_version": 1, "step": 1' + b"0" * 5000 + b"}",  # beyond Python's 4300 digits
    b"",  # an empty body was a 422 validation-error ("Field required" at ["body"])
])
def test_malformed_json_is_400(client: TestClient, content: bytes) -> None:
    body = assert_problem(raw_post(client, content), 400)
    assert body["type"] == "urn:orthoshard:problem:malformed-json"


@pytest.mark.parametrize(("content", "reason"), [
    (b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    (b'{"schema_version": 1, "step": \xff}', "not UTF-8 (invalid start byte at byte 30)"),
    (b'{"step": 1' + b"0" * 5000 + b"}", "an integer of more than 4300 digits"),
])
def test_a_body_json_cannot_parse_is_400_saying_why(client: TestClient, content: bytes,
                                                     reason: str) -> None:
    # a deeply nested body was told "not UTF-8, or a number it cannot hold"
    body = assert_problem(raw_post(client, content), 400)
    assert body["type"] == "urn:orthoshard:problem:malformed-json"
    assert reason in body["detail"]


@pytest.mark.parametrize("content", [b"{", b'{"a": "\xff"}', b"", b"{}"])
def test_an_unknown_query_parameter_is_named_whatever_the_body(client: TestClient, token: str,
                                                               content: bytes) -> None:
    # a body that is not JSON stopped FastAPI before the query was validated: 400 malformed-json
    r = client.post("/v1/snapshots", params={"dry_run": "true"}, content=content,
                    headers={"Authorization": f"Bearer {token}",
                             "Content-Type": "application/json"})
    body = assert_problem(r, 422)
    assert body["type"] == "urn:orthoshard:problem:unknown-query-parameter"
    assert body["detail"] == "Unknown query parameter 'dry_run': this path takes none."
    assert [(e["loc"], e["type"]) for e in body["errors"]] == \
        [(["query", "dry_run"], "extra_forbidden")]  # not the body's errors, nor none


def test_utf16_and_utf32_bodies_are_read_as_json_readers_recognise_them(
        client: TestClient) -> None:
    # docs/service.md's malformed-json row: these are told apart by their zero bytes
    for step, encoding in enumerate(("utf-16", "utf-16-le", "utf-32"), start=1):
        r = raw_post(client, json.dumps(snapshot(step=step)).encode(encoding))
        assert r.status_code == 201 and r.json()["step"] == step, (encoding, r.text)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_sent_as_json_is_415_naming_the_header(
    client: TestClient, token: str, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    content = json.dumps(snapshot()).encode()  # valid JSON, as `curl -d @file` sends it
    response = client.post("/v1/snapshots", content=content, headers=headers)
    body = assert_problem(response, 415)
    assert body["type"] == "urn:orthoshard:problem:unsupported-media-type"
    assert "Content-Type: application/json" in body["detail"]
    assert response.headers["Accept-Post"] == "application/json"
    assert not client.app.state.store.ready  # type: ignore[attr-defined]
    anonymous = client.post("/v1/snapshots", content=content,
                            headers={**headers, "Authorization": "Bearer wrong"})
    assert_problem(anonymous, 401)  # the token is checked first
    ok = client.post("/v1/snapshots", content=content,
                     headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 201, ok.text


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_literals_are_refused(client: TestClient, literal: str) -> None:
    text = json.dumps(snapshot()).replace('"update_rms": 0.2', f'"update_rms": {literal}')
    assert literal in text
    body = assert_problem(raw_post(client, text.encode()), 422)
    assert body["errors"][0]["type"] == "finite_number"
    assert not client.app.state.store.ready  # type: ignore[attr-defined]


def test_null_metric_is_stored_and_exported_as_nan(client: TestClient) -> None:
    body = snapshot()
    body["params"]["layers.0.attn.q.weight"]["orthogonality_error"] = None
    assert post(client, body).status_code == 201
    assert (
        client.get("/v1/params/layers.0.attn.q.weight").json()["metrics"]["orthogonality_error"]
        is None
    )
    assert 'orthoshard_orthogonality_error{param="layers.0.attn.q.weight"} NaN' in metric_lines(
        client
    )


def test_oversized_body_is_413_before_parsing(client: TestClient) -> None:
    names = tuple(f"layers.{i}.weight" for i in range(400))  # ~120 kB > the 64 kB limit
    body = assert_problem(post(client, snapshot(names=names)), 413)
    assert body["type"] == "urn:orthoshard:problem:body-too-large"
    assert not client.app.state.store.ready  # type: ignore[attr-defined]


def test_oversized_chunked_body_is_413(client: TestClient) -> None:
    chunks = (b" " * 16_000 for _ in range(8))  # a generator: sent chunked, no Content-Length
    r = client.post("/v1/snapshots", content=chunks, headers={"Content-Type": "application/json"})
    assert_problem(r, 413)


def test_too_many_params_is_refused(client: TestClient, token: str, clock: FakeClock) -> None:
    settings = Settings(token=token, db_path=":memory:", max_body_bytes=2**24)
    with TestClient(create_app(settings, clock=clock)) as big:
        names = tuple(f"p{i}" for i in range(20_001))
        body = {**snapshot(), "params": {n: {} for n in names}}
        r = big.post("/v1/snapshots", json=body, headers={"Authorization": f"Bearer {token}"})
        assert_problem(r, 422)


# ------------------------------------------------------------------------------ errors


def test_unknown_route_and_method_are_problem_details(client: TestClient) -> None:
    assert_problem(client.get("/v2/nothing"), 404)
    # the probes and /metrics answer HEAD from a route of their own, which the 405 left out
    for path in ("/healthz", "/readyz", "/metrics"):
        for method in ("PUT", "DELETE", "TRACE"):  # TRACE's said "Allow: GET" alone
            r = client.request(method, path)
            assert_problem(r, 405)
            assert r.headers["allow"] == "GET, HEAD"
    r = client.get("/v1/snapshots")
    assert_problem(r, 405)
    assert r.headers["allow"] == "POST"


def test_an_internal_error_is_a_problem_that_closes_the_connection(token: str) -> None:
    # uvicorn drops the connection after an unhandled error: without "Connection: close" the
    # client's next request on it was reset
    app = create_app(Settings(token=token, db_path=":memory:"))
    with TestClient(app, raise_server_exceptions=False) as c:
        def broken(*_: Any, **__: Any) -> None:
            raise RuntimeError("disk went away")

        app.state.store.ranks = broken
        r = c.get("/v1/optimizer", headers={"Authorization": f"Bearer {token}"})
        body = assert_problem(r, 500)
        assert "see the sidecar log" in body["detail"] and "disk" not in body["detail"]
        assert r.headers["connection"] == "close"


def test_a_name_of_dots_alone_is_read_percent_encoded(client: TestClient) -> None:
    # docs/service.md: clients resolve "." and ".." as path segments, so such a name is sent
    # as %2E (the raw URL, which httpx keeps as it is)
    assert post(client, snapshot(names=(".", ".."))).status_code == 201
    for name, path in ((".", "/v1/params/%2E"), ("..", "/v1/params/%2E%2E")):
        r = client.get(path)
        assert r.status_code == 200 and r.json()["name"] == name, r.text


def test_unknown_param_is_404(client: TestClient) -> None:
    body = assert_problem(client.get("/v1/params/no.such.weight"), 404)
    assert body["instance"] == "/v1/params/no.such.weight"
    assert_problem(client.get("/v1/params/no.such.weight/history"), 404)


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "rank=-1", "rank=65536",
                                   "rank=" + "9" * 40])
def test_bad_query_is_422(client: TestClient, query: str) -> None:
    assert_problem(client.get(f"/v1/params?{query}"), 422)


# read as pydantic reads integers, each of these passed as 10 or 5
@pytest.mark.parametrize("value", ["1_0", "%2B5", "%205", "5%20", "5.0", "%D9%A3"])
@pytest.mark.parametrize("path", ["/v1/params?limit=", "/v1/params?rank=",
                                  "/v1/params/a.w/history?from_step=",
                                  "/v1/params/a.w/history?to_step=",
                                  "/v1/params/a.w/history?limit="])
def test_an_integer_query_takes_decimal_digits_only(client: TestClient, path: str,
                                                    value: str) -> None:
    body = assert_problem(client.get(path + value), 422)
    name = path.rsplit("?", 1)[1].rstrip("=")
    assert name in str(body["errors"]) and "decimal digits" in str(body["errors"]), body
    assert client.get(path + "10").status_code in (200, 404)  # a name never posted: 404


def test_openapi_documents_every_route_and_problem_bodies(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/snapshots",
        "/v1/ranks/{rank}/finish",
        "/v1/optimizer",
        "/v1/params",
        "/v1/params/{name}",
        "/v1/params/{name}/history",
    }
    post_op = spec["paths"]["/v1/snapshots"]["post"]
    assert post_op["security"] == [{"bearer": []}]
    assert "Snapshot" in spec["components"]["schemas"]
    for code in ("400", "401", "413", "422"):
        assert PROBLEM in post_op["responses"][code]["content"]
    finish_op = spec["paths"]["/v1/ranks/{rank}/finish"]["post"]
    assert finish_op["security"] == [{"bearer": []}]
    for code in ("401", "404", "409", "422"):
        assert PROBLEM in finish_op["responses"][code]["content"]


# ------------------------------------------------------------------------------ state API


def test_dotted_param_name_detail_and_history(client: TestClient) -> None:
    name = "model.layers.11.mlp.down_proj.weight"
    for step in (1, 2, 3, 5, 8):
        post(client, snapshot(step=step, names=(name,)))
    assert client.get(f"/v1/params/{name}").json()["step"] == 8
    hist = client.get(f"/v1/params/{name}/history", params={"from_step": 2, "to_step": 5}).json()
    assert hist["name"] == name and hist["run_id"] == "run-a"
    assert [p["step"] for p in hist["points"]] == [2, 3, 5]
    assert [p["metrics"]["rotation_degrees_L_k1"] for p in hist["points"]] == [2.0, 3.0, 5.0]


def test_history_limit_gives_next_from_step_and_bad_range_is_400(client: TestClient) -> None:
    for step in range(10):
        post(client, snapshot(step=step))
    url = "/v1/params/layers.0.attn.q.weight/history"
    page = client.get(url, params={"limit": 4}).json()
    assert [p["step"] for p in page["points"]] == [0, 1, 2, 3] and page["next_from_step"] == 4
    assert_problem(client.get(url, params={"from_step": 5, "to_step": 4}), 400)
    # steps past SQLite's 64-bit integers are refused as input (they were a 500 from sqlite3)
    for key in ("from_step", "to_step"):
        assert_problem(client.get(url, params={key: 2**63}), 422)
    assert client.get(url, params={"to_step": 2**62}).status_code == 200


def _walk_history(client: TestClient, name: str, limit: int, **query: Any) -> list[Any]:
    """Every point, page after page by next_from_step (a page bound catches a loop)."""
    points: list[Any] = []
    from_step: int | None = 0
    for _ in range(100):
        page = client.get(f"/v1/params/{name}/history",
                          params={"from_step": from_step, "limit": limit, **query}).json()
        points += page["points"]
        from_step = page["next_from_step"]
        if from_step is None:
            return points
    raise AssertionError(f"paging with limit={limit} did not end after 100 pages")


def test_a_resent_step_replaces_its_point_and_every_page_size_walks_the_same_points(
    client: TestClient,
) -> None:
    # an elastic restart resumes from a checkpoint under the same run id and re-sends steps
    # (here from another owner rank); a publisher re-sends a snapshot whose answer timed out
    sends = [(1, 0, 0.1), (2, 0, 0.2), (3, 0, 0.3), (4, 0, 0.4),
             (2, 1, 0.25), (3, 1, 0.35), (3, 1, 0.35), (5, 1, 0.5)]  # fmt: skip
    for step, rank, orth in sends:
        body = snapshot(step=step, rank=rank, names=("w",))
        body["params"]["w"]["orthogonality_error"] = orth
        assert post(client, body).status_code == 201
    whole = client.get("/v1/params/w/history").json()
    assert whole["next_from_step"] is None
    assert [(p["step"], p["rank"], p["metrics"]["orthogonality_error"])
            for p in whole["points"]] == [(1, 0, 0.1), (2, 1, 0.25), (3, 1, 0.35), (4, 0, 0.4),
                                           (5, 1, 0.5)]  # fmt: skip
    for limit in range(1, 7):
        assert _walk_history(client, "w", limit) == whole["points"], limit
    assert client.app.state.store.history_rows() == 5  # type: ignore[attr-defined]


def test_history_is_per_run(client: TestClient) -> None:
    post(client, snapshot(step=1, run_id="old"))
    post(client, snapshot(step=2, run_id="new"))
    url = "/v1/params/layers.0.attn.q.weight/history"
    assert [p["step"] for p in client.get(url).json()["points"]] == [2]
    assert [p["step"] for p in client.get(url, params={"run_id": "old"}).json()["points"]] == [1]


def test_next_walks_one_run_while_a_new_run_starts_between_two_pages(client: TestClient) -> None:
    # without run_id each page read the parameter's latest run: a walk begun on run A went on
    # with run B's steps from next_from_step, two runs in one history
    for step in range(20):
        post(client, snapshot(step=step, run_id="A", names=("w",)))
    page = client.get("/v1/params/w/history", params={"limit": 5}).json()
    for step in range(30):
        post(client, snapshot(step=step, run_id="B", names=("w",)))
    points, runs = list(page["points"]), {page["run_id"]}
    while page["next"] is not None:
        assert page["next"].startswith("/v1/params/w/history?")
        page = client.get(page["next"]).json()
        points += page["points"]
        runs.add(page["run_id"])
    assert runs == {"A"} and [p["step"] for p in points] == list(range(20))
    # a name that needs escaping in the path keeps it in next
    for step in range(3):
        assert post(client, snapshot(step=step, names=("a%b?c#d",))).status_code == 201
    odd = client.get("/v1/params/a%25b%3Fc%23d/history", params={"limit": 2}).json()
    assert [p["step"] for p in client.get(odd["next"]).json()["points"]] == [2]
    # "." and "..": clients resolve such a segment as a dot segment unless it is encoded
    for name, path in ((".", "%2E"), ("..", "%2E%2E")):
        for step in range(2):
            assert post(client, snapshot(step=step, names=(name,))).status_code == 201
        first = client.get(f"/v1/params/{path}/history", params={"limit": 1}).json()
        assert first["next"].startswith(f"/v1/params/{path}/history?")
        second = client.get(first["next"])
        assert second.status_code == 200 and second.json()["name"] == name
        assert [p["step"] for p in second.json()["points"]] == [1]


@pytest.mark.parametrize("run_id", ["", "no such", "\u00ff\u00fe/x", "a" * 129])
def test_a_history_run_id_that_no_snapshot_could_carry_is_422(client: TestClient,
                                                              run_id: str) -> None:
    # an empty one silently read the default run; others answered an empty page
    post(client, snapshot(step=1, names=("w",)))
    assert_problem(client.get("/v1/params/w/history", params={"run_id": run_id}), 422)


@pytest.mark.parametrize(("path", "query", "takes"), [
    ("/v1/params/w/history", {"fromStep": 3}, "from_step, to_step, run_id, limit"),
    ("/v1/params", {"owner_rank": 1}, "limit, cursor, rank"),
    ("/v1/params/w", {"run_id": "run-a"}, "none"),
    ("/v1/optimizer", {"rank": 0}, "none"),
])
def test_a_query_parameter_an_endpoint_does_not_take_is_422_naming_it(
        client: TestClient, path: str, query: dict[str, Any], takes: str) -> None:
    # it was ignored: ?fromStep=3 answered from step 0, ?owner_rank=1 every rank's parameters
    post(client, snapshot(step=1, names=("w",)))
    body = assert_problem(client.get(path, params=query), 422)
    (name,) = query
    assert body["type"] == "urn:orthoshard:problem:unknown-query-parameter"
    assert body["detail"] == f"Unknown query parameter {name!r}: this path takes {takes}."
    assert body["errors"][0]["loc"] == ["query", name]
    assert client.get(path).status_code == 200  # without it, the same request answers


def test_cursor_pagination_walks_every_param_once_in_order(client: TestClient) -> None:
    names = tuple(f"blocks.{i:02d}.w" for i in range(23))
    post(client, snapshot(rank=0, names=names[:12]))
    post(client, snapshot(rank=1, names=names[12:]))
    seen, cursor = [], None
    while True:
        page = client.get(
            "/v1/params", params={"limit": 5, **({"cursor": cursor} if cursor else {})}
        ).json()
        seen += [item["name"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(names)
    ranked = client.get("/v1/params", params={"rank": 1, "limit": 100}).json()
    assert [i["name"] for i in ranked["items"]] == list(names[12:])


@pytest.mark.parametrize(
    "cursor",
    ["", "%%%not-base64", "!!!!", "....", "a", "YR", "YQ==", "YQ=", "Y+", "/w", "_w", "YW Jj",
     "A" * 2000,  # (longer than any name's cursor: it was a 422 validation-error)
     "AAAA", "YS9i", "G1swbQ", "YSBi"],  # "\0\0\0", "a/b", "\x1b[0m", "a b": no name's
)
def test_bad_cursor_is_400(client: TestClient, cursor: str) -> None:
    # "YR", "YQ==" decode to "a" but are not what encode_cursor produces ("YQ"); "_w" is not
    # UTF-8; the last four decode to strings no parameter can be named; the rest is not
    # base64url: each would otherwise restart the walk at page 1 (as "" did: a client turning
    # the last page's null into "" looped for ever)
    post(client, snapshot(names=("a", "b")))
    body = assert_problem(client.get("/v1/params", params={"cursor": cursor}), 400)
    assert body["type"] == "urn:orthoshard:problem:bad-cursor"


def test_a_cursor_the_api_produced_continues_after_its_name(client: TestClient) -> None:
    post(client, snapshot(names=("a", "b", "ü.w")))
    first = client.get("/v1/params", params={"limit": 1}).json()
    assert first["next_cursor"] == "YQ"
    rest = client.get("/v1/params", params={"cursor": first["next_cursor"]}).json()
    assert [i["name"] for i in rest["items"]] == ["b", "ü.w"]


def test_pages_go_on_past_a_name_an_earlier_version_stored(client: TestClient) -> None:
    # a page that ended on a name today's rule refuses (a C1 control, admitted before) handed
    # out a cursor the next request refused as bad: the names after it were never listed
    from service.schema import Snapshot

    names = ("a", "b\x9bc", "d", "e")
    old = Snapshot.model_construct(schema_version=1, run_id="r", rank=0, step=1, wall_time=T0,
                                   params={name: health(rot=1.0) for name in names},
                                   optimizer=None)
    client.app.state.store.ingest(old)  # type: ignore[attr-defined]
    seen, cursor = [], None
    while True:
        r = client.get("/v1/params", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        seen += [item["name"] for item in r.json()["items"]]
        if (cursor := r.json()["next_cursor"]) is None:
            break
    assert seen == list(names)
    # a cursor of such a name the store does not hold is still refused
    assert_problem(client.get("/v1/params", params={"cursor": "YsKbeA"}), 400)  # "b\x9bx"


@pytest.mark.parametrize(("method", "path", "body"), [
    ("post", "/v1/snapshots", snapshot(step=2, names=("w",))),
    ("post", "/v1/ranks/0/finish", {"run_id": "run-a"}),
    # a body that does not validate either: named a schema or validation error before
    ("post", "/v1/snapshots", {}),
    ("post", "/v1/snapshots", {**snapshot(step=2, names=("w",)), "step": "x"}),
    ("post", "/v1/ranks/0/finish", {}),
])
def test_a_query_parameter_a_post_does_not_take_is_422_and_nothing_is_stored(
        client: TestClient, method: str, path: str, body: dict[str, Any]) -> None:
    # ?dry_run=true stored the snapshot (201), ?x=1 finished the rank (200)
    post(client, snapshot(step=1, names=("w",)))
    r = client.request(method.upper(), path, params={"dry_run": "true"}, json=body)
    problem = assert_problem(r, 422)
    assert problem["type"] == "urn:orthoshard:problem:unknown-query-parameter"
    assert problem["detail"] == "Unknown query parameter 'dry_run': this path takes none."
    (rank,) = client.get("/v1/optimizer").json()["ranks"]
    assert rank["step"] == 1 and rank["finished_at"] is None


@pytest.mark.parametrize(("path", "query"), [
    ("/v1/params/w/history", [("run_id", "run-a"), ("run_id", "run-b")]),
    ("/v1/params", [("limit", "1"), ("limit", "2")]),
    ("/v1/optimizer", [("x", "1"), ("x", "2")]),
])
def test_a_query_parameter_given_twice_is_422(client: TestClient, path: str,
                                              query: list[tuple[str, str]]) -> None:
    # answered with its last value: run-b's history alone, a page of 2
    post(client, snapshot(step=1, names=("w", "v")))
    problem = assert_problem(client.get(path, params=query), 422)
    assert problem["type"] == "urn:orthoshard:problem:repeated-query-parameter"
    assert problem["detail"] == (f"The query parameter {query[0][0]!r} is given more than "
                                 f"once: give it once.")


def test_the_longest_names_page_on(client: TestClient) -> None:
    # 256 characters of 4 bytes each: the longest cursor the API can hand out is accepted back
    longest = ("\U0001d54f" * 256, "\U0001d550" * 256)
    post(client, snapshot(names=longest))
    first = client.get("/v1/params", params={"limit": 1}).json()
    rest = client.get("/v1/params", params={"cursor": first["next_cursor"]})
    assert rest.status_code == 200, rest.text
    assert [i["name"] for i in rest.json()["items"]] == [longest[1]]


# ------------------------------------------------------------------------------ metrics


def test_metrics_names_labels_and_values(client: TestClient, clock: FakeClock) -> None:
    post(client, snapshot(step=3, rank=2, names=("a.w",)))
    post(client, snapshot(step=4, rank=2, names=("a.w",)))
    lines = set(metric_lines(client))
    expected = {
        'orthoshard_basis_rotation_degrees{param="a.w",factor="L",k="1"} 4.0',
        'orthoshard_basis_rotation_degrees{param="a.w",factor="L",k="8"} 8.0',
        'orthoshard_basis_rotation_degrees{param="a.w",factor="R",k="1"} 0.5',
        'orthoshard_basis_rotation_degrees{param="a.w",factor="R",k="8"} 0.75',
        'orthoshard_eigengap_ratio{param="a.w",factor="L"} 0.3',
        'orthoshard_eigengap_ratio{param="a.w",factor="R"} 0.4',
        'orthoshard_orthogonality_error{param="a.w"} 0.01',
        'orthoshard_nonfinite_skips_total{param="a.w"} 2.0',
        'orthoshard_optimizer_step{rank="2"} 4.0',
        f'orthoshard_last_snapshot_timestamp_seconds{{rank="2"}} {clock.now!r}',
        'orthoshard_snapshots_received_total{rank="2"} 2.0',
    }
    assert lines == expected  # update_rms and basis_staleness_L are not exported


def test_a_finished_rank_exports_no_liveness_until_its_next_snapshot(
    client: TestClient, clock: FakeClock
) -> None:
    # OptimizerSnapshotStale reads the timestamp: a run that ended must not page as a rank that
    # stopped, and a resumed run must be watched again
    post(client, snapshot(step=7, rank=2, names=("a.w",), run_id="run-a"))
    post(client, snapshot(step=7, rank=3, names=("b.w",), run_id="run-a"))
    clock.now += 5
    r = client.post("/v1/ranks/2/finish", json={"run_id": "run-a"})
    assert r.status_code == 200, r.text
    assert r.json()["finished_at"] == clock.now and r.json()["step"] == 7
    lines = metric_lines(client)
    assert not any(ln.startswith('orthoshard_last_snapshot_timestamp_seconds{rank="2"}')
                   for ln in lines)
    assert any(ln.startswith('orthoshard_last_snapshot_timestamp_seconds{rank="3"}')
               for ln in lines)  # the rank that did not finish still is watched
    assert 'orthoshard_optimizer_step{rank="2"} 7.0' in lines  # its last state stays visible
    # its parameters' frozen values are not exported (they would count in the alerts); the
    # running rank's are
    assert not any('param="a.w"' in ln for ln in lines)
    assert 'orthoshard_orthogonality_error{param="b.w"} 0.01' in lines
    assert client.get("/v1/params/a.w").json()["step"] == 7  # the API still answers
    ranks = {r["rank"]: r for r in client.get("/v1/optimizer").json()["ranks"]}
    assert ranks[2]["finished_at"] == clock.now and ranks[3]["finished_at"] is None
    clock.now += 5
    post(client, snapshot(step=8, rank=2, names=("a.w",), run_id="run-b"))  # a new run
    lines = metric_lines(client)
    assert f'orthoshard_last_snapshot_timestamp_seconds{{rank="2"}} {clock.now!r}' in lines
    assert 'orthoshard_orthogonality_error{param="a.w"} 0.01' in lines
    assert client.get("/v1/optimizer").json()["ranks"][0]["finished_at"] is None


def test_a_new_run_of_a_rank_ends_the_export_of_its_earlier_runs_parameters(
    client: TestClient, clock: FakeClock
) -> None:
    # run-a's parameters that run-b does not report stayed exported, frozen, for the TTL: they
    # counted among the node's matrices in the rotation alert's breadth check, and a spike
    # turning 3 of run-b's 4 matrices read as 3 of 8
    post(client, snapshot(step=30, rank=0, names=("old.w", "both.w"), run_id="run-a"))
    post(client, snapshot(step=30, rank=1, names=("other.w",), run_id="run-a"))
    clock.now += 5
    post(client, snapshot(step=1, rank=0, names=("new.w", "both.w"), run_id="run-b"))
    lines = metric_lines(client)
    exported = {ln.split('param="')[1].split('"')[0] for ln in lines if 'param="' in ln}
    assert exported == {"new.w", "both.w", "other.w"}  # rank 1 still runs run-a
    assert client.get("/v1/params/old.w").json()["run_id"] == "run-a"  # the API keeps it


def test_a_snapshot_in_flight_when_its_rank_finished_keeps_the_finish(
    client: TestClient, clock: FakeClock
) -> None:
    # the finish overtook the rank's last snapshot (sent alongside it, which was slow to
    # arrive): that snapshot cleared the finish, and a run that ended paged as a stale rank
    post(client, snapshot(step=7, rank=2, wall_time=T0))
    r = client.post("/v1/ranks/2/finish", json={"run_id": "run-a", "last_wall_time": T0 + 2})
    assert r.status_code == 200, r.text
    finished = r.json()["finished_at"]
    post(client, snapshot(step=8, rank=2, wall_time=T0 + 2))  # the one in flight
    (rank,) = client.get("/v1/optimizer").json()["ranks"]
    assert (rank["step"], rank["finished_at"]) == (8, finished)
    assert not any(ln.startswith("orthoshard_last_snapshot_timestamp_seconds")
                   for ln in metric_lines(client))
    post(client, snapshot(step=9, rank=2, wall_time=T0 + 3))  # taken after it: resumed
    assert client.get("/v1/optimizer").json()["ranks"][0]["finished_at"] is None
    for bad in ("0", "-1.0", '"1"', "1e999"):  # not a wall time; 1e999 reads as Infinity
        content = f'{{"run_id": "run-a", "last_wall_time": {bad}}}'
        assert_problem(client.post("/v1/ranks/2/finish", content=content,
                                   headers={"Content-Type": "application/json"}), 422)


def test_a_finish_names_a_known_rank_and_its_current_run(client: TestClient) -> None:
    body = assert_problem(client.post("/v1/ranks/4/finish", json={"run_id": "run-a"}), 404)
    assert body["type"].endswith("unknown-rank")
    post(client, snapshot(rank=4, run_id="run-b"))
    # a late finish from an earlier run must not hide the run that is going on
    body = assert_problem(client.post("/v1/ranks/4/finish", json={"run_id": "run-a"}), 409)
    assert body["type"].endswith("other-run") and "run-b" in body["detail"]
    assert client.get("/v1/optimizer").json()["ranks"][0]["finished_at"] is None
    # unknown fields, schema_version too (it read "Unsupported or missing schema_version;
    # this sidecar accepts 1" for a 1)
    for extra in ({"x": 1}, {"schema_version": 1}):
        body = assert_problem(client.post("/v1/ranks/4/finish",
                                          json={"run_id": "run-b", **extra}), 422)
        assert body["type"] == "urn:orthoshard:problem:validation-error", body
    assert_problem(client.post("/v1/ranks/-1/finish", json={"run_id": "run-b"}), 422)
    assert_problem(client.post("/v1/ranks/4/finish", json={"run_id": "run-b"},
                               headers={"Authorization": "Bearer wrong"}), 401)
    assert client.post("/v1/ranks/4/finish", json={"run_id": "run-b"}).status_code == 200


def test_a_finish_answers_the_ranks_staleness_as_the_state_api_does(
        client: TestClient, clock: FakeClock) -> None:
    # the finish's answer said "stale": false whatever the age of the rank's last snapshot
    post(client, snapshot(rank=3, run_id="run-a"))
    clock.now += TTL + 1
    finished = client.post("/v1/ranks/3/finish", json={"run_id": "run-a"})
    assert finished.status_code == 200, finished.text
    listed = client.get("/v1/optimizer").json()["ranks"][0]
    assert finished.json()["stale"] is listed["stale"] is True


def test_a_parameter_only_in_a_late_snapshot_is_in_history_and_its_404_says_where(
        client: TestClient) -> None:
    # the 404 said no snapshot had named it, though its point was stored in history
    assert post(client, snapshot(step=5, wall_time=T0 + 5)).status_code == 201
    late = snapshot(step=3, names=("late.w",), wall_time=T0 + 3)  # taken before step 5
    assert post(client, late).status_code == 201
    body = assert_problem(client.get("/v1/params/late.w"), 404)
    assert "history keeps (pass run_id)" in body["detail"]
    points = client.get("/v1/params/late.w/history", params={"run_id": "run-a"}).json()["points"]
    assert [p["step"] for p in points] == [3]


def test_silent_series_expire_after_the_ttl(client: TestClient, clock: FakeClock) -> None:
    post(client, snapshot(rank=0, names=("old.w", "kept.w"), run_id="run-a"))
    clock.now += TTL / 2
    post(client, snapshot(rank=1, names=("kept.w",), run_id="run-b"))
    clock.now += TTL / 2 + 1  # rank 0 and old.w are now TTL + 1 s old; kept.w TTL/2 + 1 s
    lines = metric_lines(client)
    assert not any('param="old.w"' in ln or 'rank="0"' in ln for ln in lines)
    assert any('param="kept.w"' in ln for ln in lines) and any('rank="1"' in ln for ln in lines)
    old = client.get("/v1/params/old.w").json()  # still answered, marked stale
    assert old["stale"] is True and old["run_id"] == "run-a"
    clock.now += TTL
    # rank 1 runs the newest run and never finished: its rank series stay, so that the stale
    # alert goes on reading its liveness timestamp (it resolved when the series went)
    lines = metric_lines(client)
    assert not any("param=" in ln for ln in lines)
    assert {ln.split("{")[0] for ln in lines} == {
        "orthoshard_optimizer_step", "orthoshard_last_snapshot_timestamp_seconds",
        "orthoshard_snapshots_received_total"}
    assert all('rank="1"' in ln for ln in lines)
    assert client.post("/v1/ranks/1/finish", json={"run_id": "run-b"}).status_code == 200
    assert metric_lines(client) == []  # finished (by hand: a rank gone for good) and old


def test_a_dead_rank_of_the_current_run_keeps_its_liveness_sample_past_the_ttl(
        client: TestClient, clock: FakeClock) -> None:
    # its timestamp left /metrics with the TTL: OptimizerSnapshotStale resolved while the rank
    # was still dead, and Alertmanager sent "resolved"
    post(client, snapshot(rank=0, run_id="run-a"))
    post(client, snapshot(rank=1, run_id="run-a"))
    clock.now += 10 * TTL
    post(client, snapshot(rank=0, step=2, run_id="run-a"))  # rank 0 goes on; rank 1 is dead
    stamps = [ln for ln in metric_lines(client)
              if ln.startswith("orthoshard_last_snapshot_timestamp_seconds")]
    assert sorted(ln.split('rank="')[1][0] for ln in stamps) == ["0", "1"]
    # a new run on the sidecar: the old run's silent rank expires with the TTL, as before
    post(client, snapshot(rank=0, step=1, run_id="run-b"))
    assert not any('rank="1"' in ln for ln in metric_lines(client))


def test_store_dependency_override_is_used(client: TestClient, clock: FakeClock) -> None:
    other = Store(":memory:", history_max_rows=10, clock=clock)
    client.app.dependency_overrides[get_store] = lambda: other  # type: ignore[attr-defined]
    post(client, snapshot())
    assert other.ready and not client.app.state.store.ready  # type: ignore[attr-defined]
    other.close()


@pytest.mark.parametrize(("name", "shown"), [
    ("layer\x9bweight", "layer\\x9bweight"),  # C1 (U+009B, CSI), which names admitted before
    ("layer\x1b[2Jweight", "layer\\x1b[2Jweight"),  # C0 (ESC) and DEL, admitted before that
    ("layer\x7fweight", "layer\\x7fweight"),
    ("w" * 250 + "\x00" * 6, "w" * 250 + "\\x00" + "\u2026"),  # cut to the length limit
], ids=["C1", "C0", "DEL", "long"])
def test_a_summary_stored_before_names_refused_controls_is_still_served(
        client: TestClient, name: str, shown: str) -> None:
    # re-validated on read with today's name rule, it failed GET /v1/optimizer with a 500
    # (names with C0 controls or DEL did, after the fallback for C1 ones)
    from service.schema import OptimizerInfo, ParamGroup, Snapshot

    old = Snapshot.model_construct(
        schema_version=1, run_id="r", rank=0, step=1, wall_time=T0, params={},
        optimizer=OptimizerInfo.model_construct(
            class_name="Muon", state={},
            groups=[ParamGroup.model_construct(hyperparameters={"lr": 0.02}, params=[name])]))
    client.app.state.store.ingest(old)  # type: ignore[attr-defined]
    r = client.get("/v1/optimizer")
    assert r.status_code == 200, r.text
    groups = r.json()["ranks"][0]["optimizer"]["groups"]
    assert groups[0]["params"] == [shown]  # written out, not a terminal escape


# ------------------------------------------------------------------------------ a locked database

#: More writes at once than the 40 worker threads every route shared before the write lane.
_LOCKED_WRITES = 48
#: Hang guard, not a speed bound: a probe answers in milliseconds; one that waits behind the
#: writes answers only once they give up, after ``_TEST_WRITE_WAIT_S``.
_HANG_GUARD_S = 3.0
#: The writes' wait for the lock in the locked-database test: longer than the guard, so that a
#: probe answered within the guard cannot have waited for a write.
_TEST_WRITE_WAIT_S = _HANG_GUARD_S + 2.0


def _in_thread(call: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + _HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {_HANG_GUARD_S} s"
        time.sleep(0.01)


def test_probes_and_metrics_answer_while_writes_wait_for_a_locked_database(
    tmp_path: Any, token: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every ingest held a thread of the shared pool for SQLite's 5 s busy wait; with the
    # publishers' retries every thread waited, and /healthz and /metrics with them (Prometheus
    # saw up == 0). Now writes beyond max_writes are refused at once, the rest give up after
    # the store's write wait, both with 503 + Retry-After, and the probes wait for none of them.
    monkeypatch.setattr(service.store, "WRITE_WAIT_S", _TEST_WRITE_WAIT_S)
    db = str(tmp_path / "s.db")
    app = create_app(Settings(token=token, db_path=db), store=Store(db, history_max_rows=100,
                                                                    clock=clock), clock=clock)
    lane = app.state.writes
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {token}"
        assert post(c, snapshot(step=1)).status_code == 201
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another process's write transaction
        try:
            posts = [_in_thread(lambda s=s: post(c, snapshot(step=s)))
                     for s in range(2, 2 + _LOCKED_WRITES)]
            _wait_for(lambda: lane.active == lane.limit
                      and sum(bool(out) for _, out in posts) == _LOCKED_WRITES - lane.limit,
                      "every write waiting in the lane or refused")
            probes = [_in_thread(lambda p=p: c.get(p)) for p in ("/healthz", "/readyz", "/metrics")]
            for thread, _ in probes:
                thread.join(_HANG_GUARD_S)
            # the probes answered while every write in the lane still waited for the lock
            waiting = lane.active
            answered = [out[0] if out else None for _, out in probes]
            assert waiting == lane.limit, "a probe waited until the writes gave up"
            assert [getattr(r, "status_code", None) for r in answered] == [200, 200, 200]
            assert 'orthoshard_optimizer_step{rank="0"} 1.0' in answered[2].text
            for thread, _ in posts:
                thread.join(_TEST_WRITE_WAIT_S + _HANG_GUARD_S)
            refused = [out[0] for _, out in posts]
            assert len(refused) == _LOCKED_WRITES
            for r in refused:  # at once beyond the lane's limit, else after the write wait
                body = assert_problem(r, 503)
                assert body["type"] == "urn:orthoshard:problem:storage-unavailable"
                assert r.headers["retry-after"] == "1"
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert post(c, snapshot(step=60)).status_code == 201  # nothing was left waiting
        assert c.get("/v1/optimizer").json()["ranks"][0]["snapshots_received"] == 2


def test_probes_metrics_and_writes_never_wait_for_the_shared_thread_pool(token: str) -> None:
    # the dependencies (store, collector, write lane, token check) were plain functions, which
    # FastAPI runs on the shared thread pool: with its threads held by history reads waiting
    # for a locked database, /readyz and /metrics waited for a free thread (median 0.5 s).
    # Here the pool has one thread, held until the requests are answered.
    app = create_app(Settings(token=token, db_path=":memory:"))
    headers = {"Authorization": f"Bearer {token}"}

    async def scenario() -> list[int]:
        pool = anyio.to_thread.current_default_thread_limiter()
        pool.total_tokens = 1
        release = threading.Event()
        holder = asyncio.ensure_future(anyio.to_thread.run_sync(release.wait))
        while pool.borrowed_tokens < 1:
            await asyncio.sleep(0.001)
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as c:
                with anyio.fail_after(_HANG_GUARD_S):
                    return [
                        (await c.post("/v1/snapshots", json=snapshot(step=1),
                                      headers=headers)).status_code,
                        (await c.get("/readyz")).status_code,
                        (await c.get("/metrics")).status_code,
                    ]
        finally:
            release.set()
            await holder

    assert asyncio.run(scenario()) == [201, 200, 200]


def test_a_full_disk_is_a_503_logged_once_and_history_still_answers(
    token: str, clock: FakeClock, caplog: Any
) -> None:
    # a full disk failed the history read's merge with a 500, its traceback logged twice a request
    app = create_app(Settings(token=token, db_path=":memory:"), clock=clock)
    store = app.state.store
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {token}"
        assert post(c, snapshot(step=1)).status_code == 201
        full = sqlite3.OperationalError("database or disk is full")
        full.sqlite_errorcode = sqlite3.SQLITE_FULL  # as sqlite3 sets it
        store.ingest = lambda *_a, **_k: (_ for _ in ()).throw(full)
        store._merge = lambda *_a, **_k: (_ for _ in ()).throw(full)
        with caplog.at_level("WARNING", logger="orthoshard.sidecar"):
            for step in (2, 3):
                r = post(c, snapshot(step=step))
                assert assert_problem(r, 503)["type"] == \
                    "urn:orthoshard:problem:storage-unavailable"
                assert r.headers["retry-after"] == "30"
            h = c.get("/v1/params/layers.0.attn.q.weight/history")
        assert h.status_code == 200 and [p["step"] for p in h.json()["points"]] == [1]
        lines = [r for r in caplog.records if "storage unavailable" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None


def test_a_history_read_of_a_busy_database_is_a_documented_503_that_stored_nothing_to_say(
    token: str, clock: FakeClock
) -> None:
    # the route's OpenAPI listed no 503, and the answer said "nothing was stored" to a GET
    from service.records import StoreBusy

    app = create_app(Settings(token=token, db_path=":memory:"), clock=clock)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {token}"
        assert post(c, snapshot(step=1)).status_code == 201
        busy = StoreBusy(f"the database stayed busy for {WRITE_WAIT_S} s")
        app.state.store.history = lambda *_a, **_k: (_ for _ in ()).throw(busy)
        body = assert_problem(c.get("/v1/params/layers.0.attn.q.weight/history"), 503)
        assert body["type"] == "urn:orthoshard:problem:storage-unavailable"
        assert "stored" not in body["detail"] and "try again later" in body["detail"]
        route = c.get("/openapi.json").json()["paths"]["/v1/params/{name}/history"]["get"]
        assert "503" in route["responses"]
