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
from server.gateway.orders import GatewayListener, OrderListener
from server.gateway.priors import PriorsListener
from server.gateway.workflow import ReplyListener
from server.gateway.sites import Sites
from server.store.fhir import FhirStore
from server.store.imaging import ImagingIndex


def validators(settings: Settings) -> dict[str, Validator]:
    """Content rules run on create and update, by resource type ("*" for all)."""
    return {"*": check_content, "Subscription": activate_subscription}


def listeners(settings: Settings, engine: Engine, sites: Sites | None = None) -> list[Listener]:
    """Work done in the write transaction of every change (Subscription matching: FHIR R4 subscription.html;
    a teleconsult ServiceRequest's order Tasks and transfer jobs: ``server.gateway.orders``; a received consult's
    Task reported back to the requesting site: ``server.gateway.workflow``)."""
    audit = [record_audit] if settings.fhir_audit else []
    orders = OrderListener(settings, engine, sites=sites)
    return [*audit, orders, PriorsListener(orders), ReplyListener(settings, engine, sites=sites),
            SubscriptionListener()]


def projections(settings: Settings, engine: Engine) -> dict[str, Projection]:
    """Read-only resource types computed from other data: ImagingStudy from the DICOM index.

    The WADO-RS base of its Endpoint is the public base URL + ``/dicomweb`` (as the DICOMweb routes build
    RetrieveURL and BulkDataURI), or the server-relative ``/dicomweb`` when no public base URL is set.
    """
    base = settings.public_base_url
    wado = f"{base.rstrip('/')}/dicomweb" if base else "/dicomweb"
    return {"ImagingStudy": ImagingStudyProjection(ImagingIndex(engine), Options(wado_base=wado))}


def build_service(settings: Settings, engine: Engine, *, sites: Sites | None = None) -> FhirService:
    """The FhirService of an app (``sites``: the tenants' DICOM e-mail sites; loaded from the data folder when
    first needed otherwise)."""
    service = FhirService(FhirStore(engine), validators=validators(settings),
                          listeners=listeners(settings, engine, sites), projections=projections(settings, engine))
    for listener in service.listeners:
        if isinstance(listener, GatewayListener):
            listener.bind(service)
    return service
