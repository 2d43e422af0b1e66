"""Test data: small synthetic VL Whole Slide Microscopy pyramids as Part 10 bytes (PS3.3 A.32.8).

Adapted from ``/work/shared/tools/make_wsi.py``: one instance per pyramid level (each level half the size of
the one above), plus a LABEL and an OVERVIEW; tiles JPEG baseline (YBR_FULL_422) or JPEG 2000 lossless (RGB);
TILED_FULL, or TILED_SPARSE with a Plane Position (Slide) per frame, frames in reverse order and a tile left
out of every level with more than one tile.
"""

from __future__ import annotations

import datetime
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)

BASE_SPACING_MM = 0.00025  # 0.25 um per pixel at level 0


@dataclass
class Slide:
    """A synthetic slide: its files and, per level, the stored tile bytes by (col, row)."""

    study_uid: str
    series_uid: str
    label_series_uid: str
    transfer_syntax: str
    files: dict[str, bytes] = field(default_factory=dict)
    sops: dict[str, str] = field(default_factory=dict)  # file name -> SOP Instance UID
    tiles: list[dict[tuple[int, int], bytes]] = field(default_factory=list)  # level -> (col, row) -> bytes
    sizes: list[tuple[int, int]] = field(default_factory=list)  # level -> (width, height)
    images: list[np.ndarray] = field(default_factory=list)  # level -> RGB pixels

    @property
    def series_uids(self) -> list[str]:
        """The slide's series (the label's own series when it has one)."""
        return list(dict.fromkeys([self.series_uid, self.label_series_uid]))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def synthetic_slide(width: int, height: int, seed: int = 1) -> np.ndarray:
    """Pinkish background with a tissue disc and purple 'nuclei'; uint8 RGB (height x width x 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    img = np.empty((height, width, 3), np.float32)
    img[...] = (240, 225, 235)
    tissue = ((x - .5) ** 2 + (y - .5) ** 2) < .16
    img[tissue] = (225, 160, 200)
    small = rng.random((height // 16 + 1, width // 16 + 1)) > 0.93
    nuclei = np.kron(small, np.ones((16, 16), bool))[:height, :width] & tissue
    img[nuclei] = (110, 60, 150)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(tile: np.ndarray, transfer_syntax: str) -> bytes:
    """One tile as JPEG baseline (4:2:0) or a JPEG 2000 lossless codestream, padded to even length as stored
    in an encapsulated fragment (PS3.5 A.4)."""
    out = io.BytesIO()
    if transfer_syntax == JPEGBaseline8Bit:
        Image.fromarray(tile).save(out, format="JPEG", quality=90, subsampling=2)
    else:
        Image.fromarray(tile).save(out, format="JPEG2000", no_jp2=True, irreversible=False)
    data = out.getvalue()
    return data + b"\x00" if len(data) % 2 else data


def _derived(slide: Slide, what: str) -> str:
    """A UID of the slide that stays the same across its instances."""
    return generate_uid(entropy_srcs=[slide.study_uid, what])


def _photometric(transfer_syntax: str) -> str:
    return "YBR_FULL_422" if transfer_syntax == JPEGBaseline8Bit else "RGB"


def _base_dataset(slide: Slide, series_uid: str, image_type: list[str], width: int, height: int, tile: int,
                  pixel_mm: float, frames: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = slide.transfer_syntax
    ds.SOPClassUID, ds.SOPInstanceUID = VLWholeSlideMicroscopyImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    now = datetime.datetime(2026, 11, 23, 10, 0, 0)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.Modality, ds.Manufacturer = "SM", "telerad-tests"
    ds.ManufacturerModelName, ds.DeviceSerialNumber, ds.SoftwareVersions = "synthetic", "0001", "1.0"
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "WSI^Test", "WSI001", "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = slide.study_uid, series_uid
    ds.FrameOfReferenceUID = _derived(slide, "frame-of-reference")
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.AccessionNumber = "1", 1, 1, ""
    ds.ReferringPhysicianName = ""
    ds.ImageType = image_type
    ds.ContainerIdentifier = "SLIDE-1"
    ds.IssuerOfTheContainerIdentifierSequence = Sequence([])
    ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
    spec = Dataset()
    spec.SpecimenIdentifier, spec.SpecimenUID = "SPEC-1", _derived(slide, "specimen")
    spec.IssuerOfTheSpecimenIdentifierSequence = Sequence([])
    spec.SpecimenPreparationSequence = Sequence([])
    ds.SpecimenDescriptionSequence = Sequence([spec])
    ds.DimensionOrganizationType = "TILED_FULL"
    organization = Dataset()
    organization.DimensionOrganizationUID = _derived(slide, "dimension-organization")
    ds.DimensionOrganizationSequence = Sequence([organization])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, _photometric(slide.transfer_syntax), 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfFrames = frames
    ds.NumberOfOpticalPaths = 1
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = width * pixel_mm, height * pixel_mm, 0.001
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.VolumetricProperties, ds.SpecimenLabelInImage, ds.BurnedInAnnotation = "VOLUME", "NO", "NO"
    ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
    if slide.transfer_syntax == JPEGBaseline8Bit:
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
        ds.LossyImageCompressionRatio = 15
    else:
        ds.LossyImageCompression = "00"
    ds.AcquisitionContextSequence = Sequence([])
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.IlluminationTypeCodeSequence = Sequence([_code("111744", "DCM", "Brightfield illumination")])
    path.IlluminationColorCodeSequence = Sequence([_code("414298005", "SCT", "Full Spectrum")])
    ds.OpticalPathSequence = Sequence([path])
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [pixel_mm, pixel_mm]
    measures.SliceThickness = measures.SpacingBetweenSlices = 0.001
    shared.PixelMeasuresSequence = Sequence([measures])
    frame_type = Dataset()
    frame_type.FrameType = image_type
    shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
    identification = Dataset()
    identification.OpticalPathIdentifier = "1"
    shared.OpticalPathIdentificationSequence = Sequence([identification])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    return ds


def _grid(img: np.ndarray, tile: int) -> dict[tuple[int, int], np.ndarray]:
    """The tiles of an image by (col, row), edge tiles padded with white."""
    h, w, _ = img.shape
    out = {}
    for row, ty in enumerate(range(0, h, tile)):
        for col, tx in enumerate(range(0, w, tile)):
            t = np.full((tile, tile, 3), 255, np.uint8)
            part = img[ty:ty + tile, tx:tx + tile]
            t[:part.shape[0], :part.shape[1]] = part
            out[(col, row)] = t
    return out


def _sparse(ds: Dataset, encoded: dict[tuple[int, int], bytes], tile: int, pixel_mm: float) -> list[bytes]:
    """Make ``ds`` TILED_SPARSE: one tile left out, frames in reverse order, a Plane Position (Slide) each."""
    keys = sorted(encoded, key=lambda k: (k[1], k[0]))
    if len(keys) > 1:
        del encoded[keys[-1]]  # the bottom-right tile is not stored
        keys = keys[:-1]
    keys.reverse()
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.NumberOfFrames = len(keys)
    frames = []
    for col, row in keys:
        position = Dataset()
        position.ColumnPositionInTotalImagePixelMatrix = 1 + col * tile
        position.RowPositionInTotalImagePixelMatrix = 1 + row * tile
        position.XOffsetInSlideCoordinateSystem = 20.0 - row * tile * pixel_mm
        position.YOffsetInSlideCoordinateSystem = 40.0 - col * tile * pixel_mm
        position.ZOffsetInSlideCoordinateSystem = 0.0
        item = Dataset()
        item.PlanePositionSlideSequence = Sequence([position])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    return [encoded[k] for k in keys]


def _save(ds: Dataset, frames: list[bytes]) -> bytes:
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def make_slide(*, width: int = 1000, height: int = 768, tile: int = 256, levels: int = 3,
               transfer_syntax: str = JPEGBaseline8Bit, sparse: bool = False, label_series: bool = False,
               seed: int = 1) -> Slide:
    """A pyramid of ``levels`` levels (each half the size of the one above) + LABEL + OVERVIEW, as bytes.

    With ``label_series`` the label is stored in a series of its own (the slide then spans two series).
    """
    study_uid, series_uid = generate_uid(), generate_uid()
    slide = Slide(study_uid, series_uid, generate_uid() if label_series else series_uid, str(transfer_syntax))
    base = synthetic_slide(width, height, seed)
    for level in range(levels):
        factor = 2 ** level
        img = base if factor == 1 else np.asarray(Image.fromarray(base).reduce(factor))
        h, w, _ = img.shape
        encoded = {k: encode(t, slide.transfer_syntax) for k, t in _grid(img, tile).items()}
        image_type = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0 else \
            ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds = _base_dataset(slide, series_uid, image_type, w, h, tile, BASE_SPACING_MM * factor, len(encoded))
        ds.InstanceNumber = level + 1
        if sparse:
            frames = _sparse(ds, encoded, tile, BASE_SPACING_MM * factor)
        else:
            frames = [encoded[k] for k in sorted(encoded, key=lambda k: (k[1], k[0]))]
        name = f"level{level}.dcm"
        slide.files[name] = _save(ds, frames)
        slide.sops[name] = str(ds.SOPInstanceUID)
        slide.tiles.append(encoded)
        slide.sizes.append((w, h))
        slide.images.append(img)
    label = np.full((128, 256, 3), 250, np.uint8)
    label[40:88, 20:236] = (20, 20, 20)
    overview = np.asarray(Image.fromarray(base).resize((256, 256)))
    for kind, number, arr, series in (("LABEL", 10, label, slide.label_series_uid),
                                      ("OVERVIEW", 11, overview, series_uid)):
        h, w, _ = arr.shape
        ds = _base_dataset(slide, series, ["ORIGINAL", "PRIMARY", kind, "NONE"], w, h, max(h, w), 0.05, 1)
        ds.Rows, ds.Columns = h, w
        ds.InstanceNumber = number
        ds.SpecimenLabelInImage = "YES"
        if kind == "LABEL":
            ds.BurnedInAnnotation, ds.BarcodeValue, ds.LabelText = "YES", "SLIDE-1", "SLIDE-1"
        name = f"{kind.lower()}.dcm"
        slide.files[name] = _save(ds, [encode(arr, slide.transfer_syntax)])
        slide.sops[name] = str(ds.SOPInstanceUID)
    return slide


def stow(client, headers: dict[str, str], files: list[bytes]) -> None:
    """Store Part 10 files in one STOW-RS request of an in-process test client; all must be stored."""
    from tests.dicomdata import multipart

    body, ctype = multipart(files)
    r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **headers})
    assert r.status_code == 200, r.text


__all__ = ["JPEG2000Lossless", "JPEGBaseline8Bit", "Slide", "encode", "make_slide", "stow", "synthetic_slide"]
