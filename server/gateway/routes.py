"""The DICOM e-mail gateway's JSON API for the web UI: transfer jobs, inbound sets, quarantine, transfer
statistics (JSON or CSV) (parse, call one service, render). Errors are rendered by the app's handlers
(ServerError kind -> HTTP status, DICOM JSON body).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from server.errors import invalid
from server.gateway.jobs import Action, Priority
from server.gateway.service import GatewayService, JobView, Page
from server.gateway.tasks import instant, priority_code
from server.security.http import principal_of
from server.security.tokens import Principal
from server.store import gateway as gw

router = APIRouter(prefix="/gateway", tags=["DICOM e-mail gateway"])
MAX_UIDS = 100_000  # series or instances named in one transfer request
POST_ACTIONS = frozenset(a.value for a in Action if a is not Action.DELETE)


def _principal(request: Request) -> Principal:
    return principal_of(request)


def _service(request: Request) -> GatewayService:
    return request.app.state.gateway


Caller = Annotated[Principal, Depends(_principal)]
Gateway = Annotated[GatewayService, Depends(_service)]
Offset = Annotated[int, Query(ge=0, description="Items to skip")]
Limit = Annotated[int, Query(ge=1, le=500, description="Items per page (at most 500)")]


class TransferRequest(BaseModel):
    """A study (or some of its series or instances) to send to one recipient."""

    model_config = ConfigDict(extra="forbid")

    study: str = Field(max_length=64, description="Study Instance UID")
    series: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, max_length=MAX_UIDS, description="Series Instance UIDs (absent: the whole study)")
    instances: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, max_length=MAX_UIDS, description="SOP Instance UIDs (absent: whole study/series)")
    recipient: str = Field(max_length=200, description="Endpoint/x, HealthcareService/x or Organization/x of the "
                                                       "directory")
    priority: str | None = Field(default=None, max_length=16,
                                 description="routine, urgent, asap or stat (stat = emergency)")
    task: str | None = Field(default=None, max_length=64, description="Id of the FHIR Task mirror (absent: a new UUID)")


# ---- rendering -------------------------------------------------------------------------------------------------
def _time(seconds: float | None) -> str | None:
    return None if seconds is None else instant(seconds, "seconds")


def _job(view: JobView) -> dict:
    j = view.job
    body = {
        "id": j.job_id, "kind": j.kind, "state": j.state, "study": j.study_uid,
        "recipient": {"address": j.recipient_address, "endpoint": j.recipient_endpoint,
                      "fingerprint": j.recipient_fingerprint},
        "sender": j.sender_address, "setId": j.set_id,
        "images": 0 if j.is_message else j.total, "sent": j.sent, "acknowledged": j.acknowledged, "failed": j.failed,
        "patientName": j.patient_name, "studyDescription": j.study_description, "studyDate": j.study_date,
        "priority": priority_code(j.priority), "emergency": j.priority == Priority.STAT,
        "error": j.error, "created": _time(j.created), "updated": _time(j.updated), "task": view.task,
    }
    if view.mails:
        body["mails"] = [{"part": m.set_part, "sopInstanceUid": m.sop_instance_uid, "state": m.state,
                          "attempts": m.attempts, "messageId": m.message_id, "sent": _time(m.sent_at),
                          "acknowledged": _time(m.acknowledged_at), "disposition": m.disposition,
                          "error": m.last_error} for m in view.mails]
    return body


def _set(s: gw.SetRow) -> dict:
    return {"id": s.pk, "setId": s.set_id, "sender": s.sender, "study": s.study_uid, "total": s.total,
            "received": s.parts_seen, "state": s.state, "firstSeen": _time(s.first_seen),
            "lastSeen": _time(s.last_seen)}


def _quarantined(q: gw.Quarantined) -> dict:
    return {"id": q.pk, "reason": q.reason, "message": q.message, "sender": q.sender, "messageId": q.message_id,
            "created": _time(q.created)}


def _page(page: Page, key: str, render) -> dict:
    return {"total": page.total, key: [render(item) for item in page.items]}


# ---- transfer jobs ---------------------------------------------------------------------------------------------
@router.post("/jobs", status_code=201,
             description="Queue a transfer of a study (or some series/instances) to a recipient of the directory: "
                         "one DICOM e-mail per instance, mirrored as a FHIR Task (transfer-task). 201 + Location.")
def create_job(body: TransferRequest, principal: Caller, gateway: Gateway) -> Response:
    job = gateway.create_transfer(principal, study_uid=body.study, series_uids=body.series,
                                  sop_instance_uids=body.instances, recipient=body.recipient,
                                  priority=body.priority, task_id=body.task)
    return JSONResponse(_job(JobView(job, f"Task/{job.task_id}" if job.task_id else None)), status_code=201,
                        headers={"Location": f"/gateway/jobs/{job.job_id}"})


@router.get("/jobs", description="The tenant's transfer jobs, newest first: state all (default), active, waiting, "
                                 "finished, paused or failed (failed and aborted).")
def list_jobs(principal: Caller, gateway: Gateway, state: str | None = None, offset: Offset = 0,
              limit: Limit = 50) -> dict:
    return _page(gateway.list_jobs(principal, state, offset, limit), "jobs", _job)


@router.get("/jobs/{job_id}", description="One transfer job with its instance mails.")
def get_job(job_id: str, principal: Caller, gateway: Gateway) -> dict:
    return _job(gateway.get_job(principal, job_id))


@router.post("/jobs/{job_id}/{action}", description="pause, resume, abort or retry a job; 409 when its state does "
                                                    "not allow the action.")
def act(job_id: str, action: str, principal: Caller, gateway: Gateway) -> dict:
    return _job(gateway.act(principal, job_id, _action(action)))


def _action(action: str) -> Action:
    if action not in POST_ACTIONS:
        raise invalid(f"unknown action {action!r} (pause, resume, abort or retry)", parameter="action")
    return Action(action)


@router.delete("/jobs/{job_id}", status_code=204, description="Delete a paused, failed, aborted or finished job "
                                                             "(its FHIR Task stays; an open one is cancelled).")
def delete_job(job_id: str, principal: Caller, gateway: Gateway) -> Response:
    gateway.act(principal, job_id, Action.DELETE)
    return Response(status_code=204)


# ---- inbound sets and quarantine -------------------------------------------------------------------------------
@router.get("/sets", description="Inbound DRG sets, newest first (state: collecting, complete, imported, "
                                 "reported-incomplete, discarded).")
def list_sets(principal: Caller, gateway: Gateway, state: str | None = None, offset: Offset = 0,
              limit: Limit = 50) -> dict:
    return _page(gateway.list_sets(principal, state, offset, limit), "sets", _set)


@router.post("/sets/{set_pk}/import", description="Import a set into the archive (an operator may import an "
                                                  "incomplete set).")
def import_set(set_pk: int, principal: Caller, gateway: Gateway) -> dict:
    return _set(gateway.import_set(principal, set_pk))


@router.post("/sets/{set_pk}/discard", description="Discard a set that was not imported.")
def discard_set(set_pk: int, principal: Caller, gateway: Gateway) -> dict:
    return _set(gateway.discard_set(principal, set_pk))


@router.get("/quarantine", description="Mails refused for import (unsigned, unverifiable, malformed), newest first.")
def quarantine(principal: Caller, gateway: Gateway, offset: Offset = 0, limit: Limit = 50) -> dict:
    return _page(gateway.quarantine(principal, offset, limit), "mails", _quarantined)


# ---- transfer statistics ---------------------------------------------------------------------------------------
CSV_TYPE, JSON_TYPE = "text/csv", "application/json"
FORMATS = ("json", "csv")


def _wants_csv(format: str | None, accept: str | None) -> bool:
    """``format`` decides (json, csv); without it an Accept header naming text/csv before application/json."""
    if format:
        if format.lower() not in FORMATS:
            raise invalid(f"unknown format {format!r} (json or csv)", parameter="format")
        return format.lower() == "csv"
    types = [item.split(";")[0].strip().lower() for item in (accept or "").split(",")]
    if CSV_TYPE not in types:
        return False
    return JSON_TYPE not in types or types.index(CSV_TYPE) < types.index(JSON_TYPE)


@router.get("/statistics", description=(
    "Transfer statistics of the tenant per period (Europe/Berlin calendar days or months, or the total), partner "
    "site and direction: transfers, studies, instances, bytes, median and 95th percentile seconds from the order to "
    "the last receipt (sent) or from the first to the last part (received; nearest-rank), failed jobs and sets by "
    "reason, quarantined mails by reason. Rows with partner '*' are the totals over all partners. JSON, or CSV with "
    "format=csv or Accept: text/csv."),
    responses={200: {"content": {CSV_TYPE: {"schema": {"type": "string"}}}}})
def statistics(request: Request, principal: Caller, gateway: Gateway,
               period: Annotated[str | None, Query(description="day, month (default) or total")] = None,
               start: Annotated[str | None, Query(alias="from", description="First day YYYY-MM-DD (Berlin)")] = None,
               end: Annotated[str | None, Query(alias="to", description="Last day YYYY-MM-DD, inclusive")] = None,
               partner: Annotated[str | None, Query(description="Partner mail address or Endpoint/<id>")] = None,
               direction: Annotated[str | None, Query(description="sent, received or both (default)")] = None,
               format: Annotated[str | None, Query(description="json (default) or csv")] = None) -> Response:
    as_csv = _wants_csv(format, request.headers.get("accept"))
    report = gateway.statistics(principal, period=period, start=start, end=end, partner=partner,
                                direction=direction)
    if as_csv:
        return Response(report.to_csv(), media_type=f"{CSV_TYPE}; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="transfer-statistics.csv"'})
    return JSONResponse(report.to_json())
