"""WADO-URI (PS3.18 9; issue 6)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["DICOMweb"])
