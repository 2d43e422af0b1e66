"""Whole-slide imaging conveniences beside the standard frames (issue 6)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])
