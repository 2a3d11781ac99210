"""``POST /v1/snapshots``: accept one rank's snapshot."""

from __future__ import annotations

from fastapi import APIRouter, status

from service.deps import Authenticated, StoreDep
from service.problems import problem_responses
from service.schema import Accepted, Snapshot

router = APIRouter(prefix="/v1", tags=["ingest"], dependencies=[Authenticated])


@router.post(
    "/snapshots",
    status_code=status.HTTP_201_CREATED,
    summary="Ingest a snapshot (schema v1)",
    responses=problem_responses(400, 401, 413, 415, 422),
)
def post_snapshot(snapshot: Snapshot, store: StoreDep) -> Accepted:
    """Validate and store a snapshot; it is durable in SQLite before the 201 is sent.

    Refused with nothing stored: malformed JSON (400), a body over the size limit (413), a body
    not sent as ``application/json`` (415),
    unknown ``schema_version``, unknown fields, wrong types, NaN/Infinity tokens or collections
    over their bounds (422), a missing or wrong token (401).
    """
    stored = store.ingest(snapshot)
    return Accepted(
        run_id=snapshot.run_id, rank=snapshot.rank, step=snapshot.step, params_stored=stored
    )
