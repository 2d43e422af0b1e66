"""Test data: synthetic Part 10 instances and pydicom's bundled files, as bytes."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

# pydicom's bundled files used across the suite: (name, why)
SAMPLES = {
    "CT_small.dcm": "CT, explicit little endian",
    "MR_small.dcm": "MR, big endian",
    "JPEG2000.dcm": "JPEG 2000 lossless/lossy",
    "SC_rgb_rle.dcm": "RLE lossless",
    "emri_small.dcm": "multi-frame MR",
    "SC_rgb_jpeg_dcmtk.dcm": "JPEG baseline, RGB",
    "rtplan.dcm": "RT Plan (no pixel data)",
    "test-SR.dcm": "Structured report",
}


def sample_path(name: str) -> Path:
    """The path of a bundled pydicom test file (never None for the files above)."""
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} not available"
    return Path(path)


def sample_bytes(name: str) -> bytes:
    """The bytes of a bundled pydicom test file."""
    return sample_path(name).read_bytes()


def sample_uids(name: str) -> tuple[str, str, str]:
    """(study, series, sop instance) UIDs of a bundled test file."""
    ds = dcmread(sample_path(name), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def make_instance(*, study: str | None = None, series: str | None = None, sop: str | None = None,
                  patient_name: str = "Müller^Jürgen", patient_id: str = "PID-1", modality: str = "CT",
                  study_date: str = "20240115", study_time: str = "101500", instance_number: int = 1,
                  series_number: int = 1, accession: str = "ACC-1", size: int = 16, **extra) -> bytes:
    """A small, valid Part 10 CT/MR image as bytes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "M"
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.ReferringPhysicianName = "Schmidt^Anna"
    ds.StudyDescription = "CT Thorax"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Axial"
    ds.InstanceNumber = instance_number
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = (np.arange(size * size, dtype=np.int16) % 1000).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart(parts: list[bytes], *, boundary: str | None = None, part_type: str = "application/dicom",
              quoted: bool = True) -> tuple[bytes, str]:
    """A multipart/related body of DICOM parts and its Content-Type header."""
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: " + part_type.encode() + b"\r\n\r\n" + p + b"\r\n"
        for p in parts
    ) + b"--" + boundary.encode() + b"--\r\n"
    b = f'"{boundary}"' if quoted else boundary
    return body, f'multipart/related; type="application/dicom"; boundary={b}'
