"""Rendered and thumbnail resources (PS3.18 10.4.1.1.3, 10.4.1.1.4; issue 6)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])
