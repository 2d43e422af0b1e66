"""Our own sites: the tenants with a DICOM e-mail identity (address + OpenPGP key pair) in this data folder.

A tenant takes part in DICOM e-mail once ``telerad keys init|import`` gave it a key in
``DATA_DIR/keys/<tenant>/``; its mail address is the one in the key's User ID (RFC 4880 section 5.11,
``Name <address>``). Loaded once at start (an edge: file I/O), then a frozen lookup in both directions:
tenant → site for sending and signing, recipient address → site for receiving.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from server.crypto import SecretKey
from server.errors import ErrorKind, ServerError
from server.gateway.keys import SECRET_FILE, load_key

log = logging.getLogger(__name__)

_ANGLE = re.compile(r"<([^<>\s]+@[^<>\s]+)>")
_BARE = re.compile(r"^\s*([^<>\s]+@[^<>\s]+)\s*$")


def address_of(user_id: str) -> str | None:
    """The mail address of a User ID (``Name <a@b>`` or a bare ``a@b``), lower-cased; None if it has none."""
    m = _ANGLE.search(user_id) or _BARE.match(user_id)
    return m.group(1).lower() if m else None


def normalize_address(address: str) -> str:
    """An address for comparison: without angle brackets and ``mailto:``, lower-cased (RFC 5321 2.4 treats
    the local part as case-sensitive, but every mail system of the network compares addresses case-blind)."""
    a = address.strip().strip("<>").strip()
    if a.lower().startswith("mailto:"):
        a = a[len("mailto:"):]
    return a.lower()


@dataclass(frozen=True)
class Site:
    """One of our tenants as a DICOM e-mail participant."""

    tenant: str
    address: str  # lower-case
    key: SecretKey

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint


class Sites:
    """The sites of this data folder, by tenant and by address."""

    def __init__(self, sites: Iterable[Site] = ()) -> None:
        by_tenant: dict[str, Site] = {}
        by_address: dict[str, Site] = {}
        for site in sites:
            if site.address in by_address:
                raise ServerError(ErrorKind.INVALID, f"tenants {by_address[site.address].tenant!r} and "
                                                     f"{site.tenant!r} share the address {site.address}")
            by_tenant[site.tenant] = site
            by_address[site.address] = site
        self._by_tenant = MappingProxyType(by_tenant)
        self._by_address = MappingProxyType(by_address)

    @classmethod
    def load(cls, data_dir: Path) -> Sites:
        """Every tenant with a key under ``DATA_DIR/keys``; a key that cannot be used is logged and skipped."""
        root = data_dir / "keys"
        sites: list[Site] = []
        if root.is_dir():
            for folder in sorted(p for p in root.iterdir() if (p / SECRET_FILE).is_file()):
                try:
                    key = load_key(data_dir, folder.name)
                except ServerError as exc:
                    log.error("tenant %s takes no part in DICOM e-mail: %s", folder.name, exc.message)
                    continue
                address = next((a for a in map(address_of, key.public_key.user_ids) if a), None)
                if address is None:
                    log.error("tenant %s: the key's User IDs %s hold no mail address", folder.name, key.user_ids)
                    continue
                sites.append(Site(folder.name, address, key))
        return cls(sites)

    def __iter__(self) -> Iterator[Site]:
        return iter(self._by_tenant.values())

    def __len__(self) -> int:
        return len(self._by_tenant)

    def of_tenant(self, tenant: str) -> Site:
        """The tenant's site; INVALID when the tenant has no DICOM e-mail identity."""
        try:
            return self._by_tenant[tenant]
        except KeyError:
            raise ServerError(ErrorKind.INVALID, f"tenant {tenant!r} has no DICOM e-mail key; create one with "
                                                 "`telerad keys init`") from None

    def by_address(self, address: str) -> Site | None:
        """The site receiving mail for ``address`` (any case, with or without ``mailto:``/brackets)."""
        return self._by_address.get(normalize_address(address))

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(self._by_address)
