"""Whole-slide image pyramids described from the instances' DICOM JSON (pure; no I/O).

A VL Whole Slide Microscopy series holds one instance per pyramid level (and per focal plane or optical
path), plus LABEL, OVERVIEW and THUMBNAIL images (PS3.3 A.32.8, C.8.12.4). Each level instance is a tiled
multi-frame image: ``Columns`` x ``Rows`` pixels per tile (frame) over a total pixel matrix of
``TotalPixelMatrixColumns`` x ``TotalPixelMatrixRows`` (PS3.3 C.8.12.4.1.1). How frames map to tiles is named
by DimensionOrganizationType (PS3.3 C.7.6.17.3):

* ``TILED_FULL``: every tile is present and the frame order is implicit: along a row of tiles left to right,
  rows top to bottom, then focal planes, then optical paths; frame number of tile (col, row) of the first
  focal plane and optical path is ``1 + col + row * tiles_across``;
* ``TILED_SPARSE`` (or no type): each frame's position is the ColumnPositionInTotalImagePixelMatrix /
  RowPositionInTotalImagePixelMatrix (1-based) of its Plane Position (Slide) Sequence in the Per-frame
  Functional Groups Sequence (PS3.3 C.8.12.6.1); tiles may be missing.

Level 0 is the highest resolution; further levels follow by decreasing TotalPixelMatrixColumns. Where several
instances share a level size (focal planes or optical paths in separate instances), the one with the lowest
InstanceNumber serves the level's tiles.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from server.errors import ErrorKind, ServerError

VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"

_IMAGE_TYPE = "00080008"
_INSTANCE_NUMBER = "00200013"
_ROWS = "00280010"
_COLUMNS = "00280011"
_NUMBER_OF_FRAMES = "00280008"
_TOTAL_COLUMNS = "00480006"
_TOTAL_ROWS = "00480007"
_FOCAL_PLANES = "00480303"  # TotalPixelMatrixFocalPlanes
_DIMENSION_ORGANIZATION_TYPE = "00209311"
_PER_FRAME = "52009230"
_SHARED = "52009229"
_PLANE_POSITION_SLIDE = "0048021A"
_COLUMN_POSITION = "0048021E"
_ROW_POSITION = "0048021F"
_PIXEL_MEASURES = "00289110"
_PIXEL_SPACING = "00280030"

TILED_FULL = "TILED_FULL"
TILED_SPARSE = "TILED_SPARSE"


class Flavor(str, enum.Enum):
    """The third value of ImageType of a WSI instance (PS3.3 C.8.12.4.1.1)."""

    VOLUME = "VOLUME"
    LABEL = "LABEL"
    OVERVIEW = "OVERVIEW"
    THUMBNAIL = "THUMBNAIL"


@dataclass(frozen=True)
class TiledImage:
    """One WSI instance: its tile grid and how tiles map to frames."""

    sop_uid: str
    transfer_syntax_uid: str
    flavor: Flavor
    instance_number: int | None
    total_columns: int
    total_rows: int
    tile_columns: int
    tile_rows: int
    number_of_frames: int
    full: bool  # TILED_FULL: frame numbers computed; else looked up in ``positions``
    positions: Mapping[tuple[int, int], int] = field(default_factory=dict, repr=False)
    pixel_spacing: tuple[float, float] | None = None  # mm (row spacing, column spacing)

    @property
    def tiles_across(self) -> int:
        """Number of tile columns of the grid."""
        return -(-self.total_columns // self.tile_columns)

    @property
    def tiles_down(self) -> int:
        """Number of tile rows of the grid."""
        return -(-self.total_rows // self.tile_rows)

    def frame_number(self, col: int, row: int) -> int | None:
        """The 1-based frame of tile (col, row), first focal plane and optical path; None when not stored.

        PS3.3 C.7.6.17.3 (TILED_FULL frame order), C.8.12.6.1 (Plane Position (Slide) of sparse tiles).
        """
        if not (0 <= col < self.tiles_across and 0 <= row < self.tiles_down):
            return None
        if self.full:
            number = 1 + col + row * self.tiles_across
            return number if number <= self.number_of_frames else None
        return self.positions.get((col, row))


@dataclass(frozen=True)
class Pyramid:
    """The images of a WSI series: resolution levels (0 = highest) and the associated images."""

    levels: tuple[TiledImage, ...]
    labels: tuple[TiledImage, ...] = ()
    overviews: tuple[TiledImage, ...] = ()
    thumbnails: tuple[TiledImage, ...] = ()

    def level(self, index: int) -> TiledImage:
        """The image of level ``index``; NOT_FOUND outside the pyramid."""
        if not 0 <= index < len(self.levels):
            raise ServerError(ErrorKind.NOT_FOUND, f"the pyramid has levels 0 to {len(self.levels) - 1}, not {index}")
        return self.levels[index]

    def tile(self, level: int, col: int, row: int) -> tuple[TiledImage, int]:
        """The image and 1-based frame number of tile (col, row) of a level; NOT_FOUND outside the grid."""
        image = self.level(level)
        number = image.frame_number(col, row)
        if number is None:
            if 0 <= col < image.tiles_across and 0 <= row < image.tiles_down:
                raise ServerError(ErrorKind.NOT_FOUND, f"no tile is stored at ({col}, {row}) of level {level}")
            raise ServerError(ErrorKind.NOT_FOUND, (
                f"tile ({col}, {row}) is outside level {level}'s grid of {image.tiles_across} x {image.tiles_down}"))
        return image, number


def _value(meta: Mapping[str, Any], tag: str, default: Any = None) -> Any:
    values = meta.get(tag, {}).get("Value")
    return values[0] if values else default


def _int(meta: Mapping[str, Any], tag: str, default: int | None = None) -> int | None:
    value = _value(meta, tag)
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _item(meta: Mapping[str, Any], tag: str) -> Mapping[str, Any]:
    """The first item of a sequence, or an empty mapping."""
    item = _value(meta, tag)
    return item if isinstance(item, Mapping) else {}


def flavor_of(meta: Mapping[str, Any]) -> Flavor | None:
    """The WSI image flavour from ImageType's third value (PS3.3 C.8.12.4.1.1), None if not a WSI flavour."""
    values = meta.get(_IMAGE_TYPE, {}).get("Value") or []
    if len(values) < 3:
        return None
    try:
        return Flavor(str(values[2]).upper())
    except ValueError:
        return None


def _positions(meta: Mapping[str, Any], tile_columns: int, tile_rows: int) -> dict[tuple[int, int], int]:
    """Tile (col, row) -> 1-based frame from the Plane Position (Slide) of each frame (PS3.3 C.8.12.6.1).

    The first frame at a position wins (further focal planes and optical paths come later in frame order).
    """
    out: dict[tuple[int, int], int] = {}
    for number, frame in enumerate(meta.get(_PER_FRAME, {}).get("Value") or [], start=1):
        position = _item(frame, _PLANE_POSITION_SLIDE) if isinstance(frame, Mapping) else {}
        column = _int(position, _COLUMN_POSITION)
        row = _int(position, _ROW_POSITION)
        if column is None or row is None or column < 1 or row < 1:
            continue
        key = ((column - 1) // tile_columns, (row - 1) // tile_rows)
        out.setdefault(key, number)
    return out


def _pixel_spacing(meta: Mapping[str, Any]) -> tuple[float, float] | None:
    measures = _item(_item(meta, _SHARED), _PIXEL_MEASURES)
    values = measures.get(_PIXEL_SPACING, {}).get("Value") or []
    try:
        return (float(values[0]), float(values[1])) if len(values) == 2 else None
    except (TypeError, ValueError):
        return None


def tiled_image(sop_uid: str, transfer_syntax_uid: str, meta: Mapping[str, Any]) -> TiledImage | None:
    """The tile grid of one WSI instance from its DICOM JSON; None when it is not a tiled WSI image.

    PS3.3 C.8.12.4 (Whole Slide Microscopy Image Module), C.7.6.17.3 (Dimension Organization Type).
    """
    flavor = flavor_of(meta)
    rows, columns = _int(meta, _ROWS), _int(meta, _COLUMNS)
    if flavor is None or not rows or not columns:
        return None
    total_columns = _int(meta, _TOTAL_COLUMNS, columns)
    total_rows = _int(meta, _TOTAL_ROWS, rows)
    frames = _int(meta, _NUMBER_OF_FRAMES, 1) or 1
    organization = str(_value(meta, _DIMENSION_ORGANIZATION_TYPE, "") or "").upper()
    full = organization == TILED_FULL or (organization != TILED_SPARSE and _PER_FRAME not in meta)
    return TiledImage(
        sop_uid=sop_uid,
        transfer_syntax_uid=transfer_syntax_uid,
        flavor=flavor,
        instance_number=_int(meta, _INSTANCE_NUMBER),
        total_columns=total_columns,
        total_rows=total_rows,
        tile_columns=columns,
        tile_rows=rows,
        number_of_frames=frames,
        full=full,
        positions={} if full else _positions(meta, columns, rows),
        pixel_spacing=_pixel_spacing(meta),
    )


def _order(image: TiledImage) -> tuple[int, int, str]:
    return (-image.total_columns, image.instance_number if image.instance_number is not None else 1 << 31,
            image.sop_uid)


def describe(instances: Iterable[tuple[str, str, Mapping[str, Any]]]) -> Pyramid:
    """The pyramid of a series from ``(sop_uid, transfer_syntax_uid, dicom_json)`` of its instances.

    Levels are the VOLUME (and THUMBNAIL-less) images ordered by decreasing TotalPixelMatrixColumns, one per
    size; NOT_FOUND when the series holds no tiled VOLUME image (PS3.3 A.32.8).
    """
    images = [img for img in (tiled_image(*i) for i in instances) if img is not None]
    by_flavor: dict[Flavor, list[TiledImage]] = {f: [] for f in Flavor}
    for image in sorted(images, key=_order):
        by_flavor[image.flavor].append(image)
    levels: list[TiledImage] = []
    for image in by_flavor[Flavor.VOLUME]:
        if not levels or (image.total_columns, image.total_rows) != (levels[-1].total_columns, levels[-1].total_rows):
            levels.append(image)
    if not levels:
        raise ServerError(ErrorKind.NOT_FOUND, "the series holds no whole-slide (VOLUME) image")
    return Pyramid(levels=tuple(levels), labels=tuple(by_flavor[Flavor.LABEL]),
                   overviews=tuple(by_flavor[Flavor.OVERVIEW]), thumbnails=tuple(by_flavor[Flavor.THUMBNAIL]))


__all__ = ["Flavor", "Pyramid", "TILED_FULL", "TILED_SPARSE", "TiledImage", "VL_WSI_SOP_CLASS", "describe",
           "flavor_of", "tiled_image"]
