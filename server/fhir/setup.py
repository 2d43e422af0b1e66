"""The FHIR service of an app: its store, content validators, write listeners and read-only projections.

The one place where the FHIR parts are put together (``create_app`` calls ``build_service``).
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from server.config import Settings
from server.fhir.audit import record as record_audit
from server.fhir.delivery import SubscriptionListener
from server.fhir.subscription import activate as activate_subscription
from server.fhir.validation import check_content
from server.fhir.imaging import ImagingStudyProjection, Options
from server.fhir.service import FhirService, Listener, Projection, Validator
from server.store.fhir import FhirStore
from server.store.imaging import ImagingIndex


def validators(settings: Settings) -> dict[str, Validator]:
    """Content rules run on create and update, by resource type ("*" for all)."""
    return {"*": check_content, "Subscription": activate_subscription}


def listeners(settings: Settings, engine: Engine) -> list[Listener]:
    """Work done in the write transaction of every change (Subscription matching: FHIR R4 subscription.html)."""
    audit = [record_audit] if settings.fhir_audit else []
    return [*audit, SubscriptionListener()]


def projections(settings: Settings, engine: Engine) -> dict[str, Projection]:
    """Read-only resource types computed from other data: ImagingStudy from the DICOM index.

    The WADO-RS base of its Endpoint is the public base URL + ``/dicomweb`` (as the DICOMweb routes build
    RetrieveURL and BulkDataURI), or the server-relative ``/dicomweb`` when no public base URL is set.
    """
    base = settings.public_base_url
    wado = f"{base.rstrip('/')}/dicomweb" if base else "/dicomweb"
    return {"ImagingStudy": ImagingStudyProjection(ImagingIndex(engine), Options(wado_base=wado))}


def build_service(settings: Settings, engine: Engine) -> FhirService:
    """The FhirService of an app."""
    return FhirService(FhirStore(engine), validators=validators(settings),
                       listeners=listeners(settings, engine), projections=projections(settings, engine))
