#!/usr/bin/env python3
"""OpenPGP and DRG mail benchmark: what one DICOM e-mail costs the gateway's CPU, in process (no network).

One command (from the repository root):

    python benchmarks/mail_crypto_bench.py                 # 512 KiB and 50 MiB payloads
    python benchmarks/mail_crypto_bench.py --sizes 512K 8M --repeat 3

Two RSA-3072 keys are made with ``server.crypto.generate_key`` (sender A, recipient B). Table 1 times
``encrypt_and_sign`` (A signs, encrypted to B; SHA-256, AES-256 SEIPD, ZLIB unless ``compress`` is off) and
``decrypt_and_verify`` on random bytes (incompressible) and on "DICOM-like" bytes (16-bit words holding 12-bit
pixels: noisy low byte, slowly ramping high byte; ZLIB shrinks them to about 60 %, like noisy CT/MR images). Table 2 times the steps of one DRG DICOM e-mail
(``server/mail/drg.py``) around a Part 10 file of the payload size: ``build_instance_mail`` with the real
OpenPGP encrypt+sign, ``parse_outer`` of the raw mail, decrypt+verify of the armored payload, ``parse_inner``
of the plaintext; and, for comparison, ``build_instance_mail`` encrypting without compression (the inner
entity is base64 text, which ZLIB shrinks little and slowly). Every number is the best of ``--repeat`` runs (wall and process CPU seconds); MB/s are of the
payload (10^6 bytes). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.crypto import decrypt_and_verify, encrypt_and_sign, generate_key  # noqa: E402
from server.mail.drg import build_instance_mail, parse_inner, parse_outer  # noqa: E402


def parse_size(text: str) -> int:
    """``512K``, ``50M`` or a byte count."""
    units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def payload(size: int, kind: str) -> bytes:
    """Random bytes, or DICOM-like 12-bit pixels: a random low byte and a high byte 0..15 that ramps slowly."""
    if kind == "random":
        return os.urandom(size)
    out = bytearray(size)
    out[0::2] = os.urandom(len(range(0, size, 2)))
    ramp = bytes(v for v in range(16) for _ in range(64))
    high = len(range(1, size, 2))
    out[1::2] = (ramp * (high // len(ramp) + 1))[:high]
    return bytes(out)


def dicom_file(size: int) -> tuple[bytes, str, str]:
    """(Part 10 bytes of about ``size`` bytes, SOP Instance UID, Study Instance UID)."""
    from io import BytesIO

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    side = max(16, int((size / 2) ** 0.5) // 2 * 2)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Bench^Mark", "BENCH-1", "CT"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = payload(side * side * 2, "dicom-like")
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), ds.SOPInstanceUID, ds.StudyInstanceUID


def best(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) of ``n`` runs."""
    walls, cpus = [], []
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def label(size: int) -> str:
    return f"{size // 1024 ** 2} MiB" if size >= 1024 ** 2 else f"{size // 1024} KiB"


def crypto_table(sizes: list[int], repeat: int, a, b) -> list[str]:
    lines = ["| payload | data | compress | enc+sign s | enc+sign MB/s | CPU s | dec+verify s | dec+verify MB/s "
             "| CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        n = repeat if size > 1024 ** 2 else repeat * 3
        for kind in ("random", "dicom-like"):
            data = payload(size, kind)
            for compress in (True, False):
                if kind == "random" and not compress:
                    continue
                message = encrypt_and_sign(data, [b], a, compress=compress)
                te, ce = best(lambda: encrypt_and_sign(data, [b], a, compress=compress), n)
                td, cd = best(lambda: decrypt_and_verify(message, [b], [a]), n)
                mb = size / 1e6
                lines.append(f"| {label(size)} | {kind} | {compress} | {te:.3f} | {mb / te:.0f} | {ce:.3f} | "
                             f"{td:.3f} | {mb / td:.0f} | {cd:.3f} |")
    return lines


def mail_table(sizes: list[int], repeat: int, a, b) -> list[str]:
    lines = ["| DICOM file | step | wall s | MB/s | CPU s |", "|---|---|---|---|---|"]
    for size in sizes:
        n = repeat if size > 1024 ** 2 else repeat * 3
        dicom, sop, study = dicom_file(size)

        def build(compress: bool = True) -> bytes:
            return build_instance_mail(dicom, sop_instance_uid=sop, study_uid=study, set_id="bench-set",
                                       set_part=1, set_total=1, sender="dicom@site-a.example",
                                       recipient="dicom@site-b.example", mdn_to="dicom@site-a.example",
                                       encrypt=lambda inner: encrypt_and_sign(inner, [b], a, compress=compress))

        raw = build()
        outer = parse_outer(raw)
        plain = decrypt_and_verify(outer.encrypted, [b], [a]).data
        assert parse_inner(plain).dicom == dicom
        steps = [("build_instance_mail (incl. encrypt+sign)", build), ("parse_outer", lambda: parse_outer(raw)),
                 ("decrypt+verify", lambda: decrypt_and_verify(outer.encrypted, [b], [a])),
                 ("parse_inner", lambda: parse_inner(plain))]
        total_wall = total_cpu = 0.0
        for name, fn in steps:
            wall, cpu = best(fn, n)
            total_wall, total_cpu = total_wall + wall, total_cpu + cpu
            lines.append(f"| {label(size)} | {name} | {wall:.4f} | {len(dicom) / 1e6 / wall:.0f} | {cpu:.4f} |")
        lines.append(f"| {label(size)} | **send + receive** (mail {len(raw) / 1e6:.2f} MB) | {total_wall:.4f} | "
                     f"{len(dicom) / 1e6 / total_wall:.0f} | {total_cpu:.4f} |")
        plain_raw = build(False)
        wall, cpu = best(lambda: build(False), n)
        lines.append(f"| {label(size)} | build_instance_mail, encrypt+sign without ZLIB (mail "
                     f"{len(plain_raw) / 1e6:.2f} MB) | {wall:.4f} | {len(dicom) / 1e6 / wall:.0f} | {cpu:.4f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["512K", "50M"], help="payload sizes (K/M suffix)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per big measurement (3x for sizes <= 1 MiB)")
    parser.add_argument("--bits", type=int, default=3072, choices=(2048, 3072, 4096))
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes]
    a = generate_key("Sender <dicom@site-a.example>", bits=args.bits)
    b = generate_key("Recipient <dicom@site-b.example>", bits=args.bits)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"RSA-{args.bits}; best of {args.repeat} (x3 for payloads <= 1 MiB)\n")
    print("OpenPGP encrypt+sign / decrypt+verify (server.crypto)\n")
    print("\n".join(crypto_table(sizes, args.repeat, a, b)))
    print("\nOne DRG DICOM e-mail (server/mail/drg.py with the real OpenPGP)\n")
    print("\n".join(mail_table(sizes, args.repeat, a, b)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
