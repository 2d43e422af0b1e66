"""Transferable public and secret keys: generate, import, export, pick by key flags (RFC 4880 sections 11.1-11.2)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import rsa

from server.crypto.armor import PRIVATE_KEY, PUBLIC_KEY, armor, dearmor, is_armored
from server.crypto.errors import (InvalidKey, KeyExpired, KeyRevoked, KeyUnusable, MalformedPacket, OpenPGPError,
                                  UnsupportedAlgorithm)
from server.crypto.material import KeyPart, parse_public, parse_secret, rsa_public_body, rsa_secret_body
from server.crypto.packets import (CERTIFICATIONS, ENCRYPT_FLAGS, CompressAlgo, HashAlgo, KeyFlag, Packet, SigType,
                                   Sub, SymAlgo, Tag, packet, read_packets, subpacket)
from server.crypto.signatures import Signature, check, key_hasher, make_signature, parse_signature

PREFERRED_SYMMETRIC = bytes([SymAlgo.AES256, SymAlgo.AES128])
PREFERRED_HASH = bytes([HashAlgo.SHA256, HashAlgo.SHA512])
PREFERRED_COMPRESSION = bytes([CompressAlgo.ZLIB, CompressAlgo.ZIP, CompressAlgo.NONE])
FEATURE_MDC = b"\x01"                 # RFC 4880 section 5.2.3.24
KEYSERVER_NO_MODIFY = b"\x80"          # RFC 4880 section 5.2.3.17


@dataclass(frozen=True)
class KeyUse:
    """A key or subkey with what its newest valid self-signature says (RFC 4880 sections 5.2.3.6, 5.2.3.21)."""

    part: KeyPart
    flags: int | None
    expires: int | None          # absolute POSIX time, None = never
    revoked: bool

    def problem(self, at: int) -> OpenPGPError | None:
        """KeyRevoked or KeyExpired when the key is not usable at time ``at``."""
        if self.revoked:
            return KeyRevoked(f"key {self.part.fingerprint.hex().upper()} is revoked")
        if self.expires is not None and at >= self.expires:
            return KeyExpired(f"key {self.part.fingerprint.hex().upper()} expired")
        return None


@dataclass(frozen=True)
class PublicKey:
    """A transferable public key (RFC 4880 section 11.1) with its verified self-signatures."""

    primary: KeyUse
    user_ids: tuple[str, ...]
    subkeys: tuple[KeyUse, ...]
    packets: bytes = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """The v4 fingerprint of the primary key as 40 upper-case hex digits (RFC 4880 section 12.2)."""
        return self.primary.part.fingerprint.hex().upper()

    @property
    def key_id(self) -> str:
        """The 64-bit key id of the primary key as 16 hex digits (RFC 4880 section 12.2)."""
        return self.primary.part.key_id.hex().upper()

    @property
    def uses(self) -> tuple[KeyUse, ...]:
        """The primary key followed by its bound subkeys."""
        return (self.primary,) + self.subkeys

    def public(self) -> PublicKey:
        """Itself (so functions can take either key type)."""
        return self


@dataclass(frozen=True)
class SecretKey:
    """A transferable secret key (RFC 4880 section 11.2) with unprotected key material."""

    public_key: PublicKey
    private: tuple[tuple[bytes, object], ...] = field(repr=False)   # (fingerprint, cryptography private key)
    packets: bytes = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """The primary key fingerprint (RFC 4880 section 12.2)."""
        return self.public_key.fingerprint

    def public(self) -> PublicKey:
        """The public half."""
        return self.public_key

    def private_for(self, part: KeyPart) -> object | None:
        """The cryptography private key of ``part``, if we hold it."""
        return next((key for fpr, key in self.private if fpr == part.fingerprint), None)


def _now(now: int | None) -> int:
    return int(time.time()) if now is None else now


def _valid(sigs: list[Signature], sig_types, primary: KeyPart, **hashed) -> list[Signature]:
    """The signatures of the given types by ``primary`` that verify, newest first (RFC 4880 section 5.2.4)."""
    good = []
    for sig in sigs:
        if sig.sig_type in sig_types and sig.issued_by(primary):
            try:
                if check(sig, primary, key_hasher(sig, primary, **hashed)):
                    good.append(sig)
            except OpenPGPError:
                continue
    return sorted(good, key=lambda s: s.created, reverse=True)


def _signs_back(binding: Signature, primary: KeyPart, sub: KeyPart) -> bool:
    """A signing subkey must carry a valid primary key binding signature 0x19 (RFC 4880 section 5.2.1)."""
    try:
        back = binding.embedded
        return (back is not None and back.sig_type == SigType.PRIMARY_KEY_BINDING
                and check(back, sub, key_hasher(back, primary, subkey=sub)))
    except OpenPGPError:
        return False


def _expiry(part: KeyPart, sig: Signature) -> int | None:
    after = sig.key_expires_after
    return part.created + after if after else None


@dataclass
class _Group:
    part: KeyPart
    private: object | None
    packet: bytes                      # the key packet as we store it (secret material unprotected)
    sigs: list[Signature] = field(default_factory=list)


def _parse_sig(body) -> Signature | None:
    try:
        return parse_signature(body)
    except (UnsupportedAlgorithm, MalformedPacket):
        return None   # RFC 4880 section 11.1: unknown signatures are ignored


def _load(packets: list[Packet], secret: bool,
          passphrase: bytes | None = None) -> tuple[PublicKey, tuple[tuple[bytes, object], ...], bytes]:
    """(public key, private keys, unprotected secret packets) of one transferable key (RFC 4880 11.1, 11.2)."""
    first = packets[0]
    if first.tag not in (Tag.PUBLIC_KEY, Tag.SECRET_KEY) or (secret and first.tag != Tag.SECRET_KEY):
        raise InvalidKey("no OpenPGP " + ("secret" if secret else "public") + " key")
    primary = _group(first, secret, passphrase)
    secret_packets = [primary.packet]
    direct: list[Signature] = []
    uids: list[tuple[bytes, list[Signature]]] = []
    subs: list[_Group] = []
    public_packets = [packet(Tag.PUBLIC_KEY, primary.part.body)]
    current = direct
    for pkt in packets[1:]:
        body = bytes(pkt.body)
        if pkt.tag != Tag.TRUST and pkt.tag not in (Tag.PUBLIC_SUBKEY, Tag.SECRET_SUBKEY):
            secret_packets.append(packet(pkt.tag, body))
        if pkt.tag == Tag.SIGNATURE:
            sig = _parse_sig(body)
            if sig is not None:
                current.append(sig)
        elif pkt.tag == Tag.USER_ID:
            uids.append((body, []))
            current = uids[-1][1]
        elif pkt.tag in (Tag.PUBLIC_SUBKEY, Tag.SECRET_SUBKEY):
            try:
                subs.append(_group(pkt, secret, passphrase))
            except UnsupportedAlgorithm:
                secret_packets.append(packet(pkt.tag, body))
                current = []
                continue
            secret_packets.append(subs[-1].packet)
            current = subs[-1].sigs
            public_packets.append(packet(Tag.PUBLIC_SUBKEY, subs[-1].part.body))
            continue
        elif pkt.tag == Tag.USER_ATTRIBUTE:
            current = []
        elif pkt.tag == Tag.TRUST:
            continue
        public_packets.append(packet(pkt.tag, body))
    part = primary.part
    revoked = bool(_valid(direct, {SigType.KEY_REVOCATION}, part))
    user_ids, self_sigs = [], []
    for uid, sigs in uids:
        certs = _valid(sigs, CERTIFICATIONS, part, uid=uid)
        revocations = _valid(sigs, {SigType.CERT_REVOCATION}, part, uid=uid)
        if certs and not (revocations and revocations[0].created >= certs[0].created):
            user_ids.append(uid.decode("utf-8", "replace"))
            self_sigs.append(certs[0])
    self_sigs += _valid(direct, {SigType.DIRECT_KEY}, part)
    if not self_sigs:
        raise InvalidKey("OpenPGP key without a valid self-signature")
    best = max(self_sigs, key=lambda s: s.created)
    uses = [KeyUse(part, best.key_flags, _expiry(part, best), revoked)]
    privates = [(part.fingerprint, primary.private)] if primary.private is not None else []
    for sub in subs:
        bindings = _valid(sub.sigs, {SigType.SUBKEY_BINDING}, part, subkey=sub.part)
        if not bindings:
            continue
        flags = bindings[0].key_flags
        if flags is not None and flags & KeyFlag.SIGN and not _signs_back(bindings[0], part, sub.part):
            flags &= ~KeyFlag.SIGN
        sub_revoked = bool(_valid(sub.sigs, {SigType.SUBKEY_REVOCATION}, part, subkey=sub.part))
        uses.append(KeyUse(sub.part, flags, _expiry(sub.part, bindings[0]), sub_revoked))
        if sub.private is not None:
            privates.append((sub.part.fingerprint, sub.private))
    key = PublicKey(uses[0], tuple(user_ids), tuple(uses[1:]), b"".join(public_packets))
    return key, tuple(privates), b"".join(secret_packets)


def _group(pkt: Packet, secret: bool, passphrase: bytes | None) -> _Group:
    """A key packet; secret material is only read (and unprotected) when importing a secret key."""
    if secret and pkt.tag in (Tag.SECRET_KEY, Tag.SECRET_SUBKEY):
        part, private, body = parse_secret(pkt.body, passphrase)
        return _Group(part, private, packet(pkt.tag, body))
    part, _end = parse_public(pkt.body)
    return _Group(part, None, packet(pkt.tag, bytes(pkt.body)))


def _split_keys(data: bytes) -> list[list[Packet]]:
    """Split a keyring into transferable keys at each primary key packet (RFC 4880 section 11.1)."""
    if is_armored(data):
        kind, data = dearmor(data)
        if kind not in (PUBLIC_KEY, PRIVATE_KEY):
            raise InvalidKey(f"expected an OpenPGP key block, got {kind}")
    keys: list[list[Packet]] = []
    for pkt in read_packets(data):
        if pkt.tag in (Tag.PUBLIC_KEY, Tag.SECRET_KEY):
            keys.append([pkt])
        elif not keys:
            raise InvalidKey("OpenPGP key block does not start with a primary key")
        else:
            keys[-1].append(pkt)
    if not keys:
        raise InvalidKey("empty OpenPGP key block")
    return keys


def import_public_keys(data: bytes) -> list[PublicKey]:
    """Every transferable public key in an armored or binary keyring (RFC 4880 section 11.1)."""
    return [_load(packets, secret=False)[0] for packets in _split_keys(data)]


def import_public_key(data: bytes) -> PublicKey:
    """Exactly one transferable public key, armored or binary (RFC 4880 section 11.1)."""
    keys = import_public_keys(data)
    if len(keys) != 1:
        raise InvalidKey(f"expected one OpenPGP key, found {len(keys)}")
    return keys[0]


def import_secret_key(data: bytes, *, passphrase: bytes | None = None) -> SecretKey:
    """One transferable secret key, armored or binary (RFC 4880 section 11.2).

    Material may be plain (S2K usage 0) or AES/S2K passphrase-protected as gpg exports it; the key we keep
    (and export again) is unprotected. GnuPG stubs (S2K 101, e.g. ``--export-secret-subkeys``) carry no secret.
    """
    keys = _split_keys(data)
    if len(keys) != 1:
        raise InvalidKey(f"expected one OpenPGP secret key, found {len(keys)}")
    public, private, packets = _load(keys[0], secret=True, passphrase=passphrase)
    return SecretKey(public, private, packets)


def export_public_key(key: PublicKey | SecretKey) -> bytes:
    """ASCII-armored transferable public key (RFC 4880 sections 6.2, 11.1)."""
    return armor(PUBLIC_KEY, key.public().packets)


def export_secret_key(key: SecretKey) -> bytes:
    """ASCII-armored transferable secret key, material unencrypted (S2K usage 0, RFC 4880 section 5.5.3)."""
    return armor(PRIVATE_KEY, key.packets)


def _self_sig_subpackets(flags: int, expires_in: int | None) -> list[bytes]:
    subs = [subpacket(Sub.KEY_FLAGS, bytes([flags]))]
    if expires_in:
        subs.append(subpacket(Sub.KEY_EXPIRATION_TIME, expires_in.to_bytes(4, "big")))
    return subs


def generate_key(user_id: str, *, bits: int = 3072, created: int | None = None,
                 expires_in: int | None = None) -> SecretKey:
    """RSA certify+sign primary key, RSA encryption subkey, one User ID, like ``gpg --quick-gen-key`` (section 11.1).

    The self-signature is a positive certification (0x13) with key flags and preferences AES256/AES128,
    SHA256/SHA512, ZLIB/ZIP/none and the MDC feature; the subkey binding (0x18) carries flags 0x0C.
    """
    if bits not in (2048, 3072, 4096):
        raise ValueError("RSA key size must be 2048, 3072 or 4096")
    created = _now(created)
    primary_key = rsa.generate_private_key(65537, bits)
    sub_key = rsa.generate_private_key(65537, bits)
    primary_body = rsa_public_body(primary_key.public_key(), created)
    sub_body = rsa_public_body(sub_key.public_key(), created)
    primary, _ = parse_public(primary_body)
    sub, _ = parse_public(sub_body)
    uid = user_id.encode("utf-8")
    prefs = [subpacket(Sub.PREFERRED_SYMMETRIC, PREFERRED_SYMMETRIC), subpacket(Sub.PREFERRED_HASH, PREFERRED_HASH),
             subpacket(Sub.PREFERRED_COMPRESSION, PREFERRED_COMPRESSION), subpacket(Sub.FEATURES, FEATURE_MDC),
             subpacket(Sub.KEYSERVER_PREFS, KEYSERVER_NO_MODIFY)]
    cert = make_signature(sig_type=SigType.POSITIVE_CERT, signer=primary, private=primary_key,
                          hash_algo=HashAlgo.SHA256, hasher=key_hasher(HashAlgo.SHA256, primary, uid=uid),
                          hashed=_self_sig_subpackets(KeyFlag.CERTIFY | KeyFlag.SIGN, expires_in) + prefs,
                          created=created)
    binding = make_signature(sig_type=SigType.SUBKEY_BINDING, signer=primary, private=primary_key,
                             hash_algo=HashAlgo.SHA256, hasher=key_hasher(HashAlgo.SHA256, primary, subkey=sub),
                             hashed=_self_sig_subpackets(ENCRYPT_FLAGS, expires_in), created=created)
    blob = (packet(Tag.SECRET_KEY, rsa_secret_body(primary_key, primary_body)) + packet(Tag.USER_ID, uid)
            + packet(Tag.SIGNATURE, cert) + packet(Tag.SECRET_SUBKEY, rsa_secret_body(sub_key, sub_body))
            + packet(Tag.SIGNATURE, binding))
    return import_secret_key(blob)


def encryption_key(key: PublicKey | SecretKey, *, now: int | None = None) -> KeyPart:
    """The newest usable encryption-capable (sub)key by key flags (RFC 4880 section 5.2.3.21)."""
    public = key.public()
    at = _now(now)
    if problem := public.primary.problem(at):
        raise problem
    candidates = [use for use in public.uses if use.part.can_encrypt
                  and (use.flags & ENCRYPT_FLAGS if use.flags is not None else use is not public.primary)]
    usable = [use for use in candidates if use.problem(at) is None]
    if usable:
        return max(usable, key=lambda use: use.part.created).part
    if candidates:
        raise candidates[-1].problem(at)
    raise KeyUnusable(f"key {public.fingerprint} has no usable encryption subkey")


def signing_key(key: SecretKey, *, now: int | None = None) -> tuple[KeyPart, object]:
    """(part, private key) of the newest usable signing (sub)key we hold (RFC 4880 section 5.2.3.21)."""
    at = _now(now)
    public = key.public()
    if problem := public.primary.problem(at):
        raise problem
    usable = [use for use in public.uses if use.part.can_sign and key.private_for(use.part) is not None
              and (use.flags is None or use.flags & KeyFlag.SIGN) and use.problem(at) is None]
    if not usable:
        raise KeyUnusable(f"key {public.fingerprint} has no usable signing key")
    best = max(usable, key=lambda use: (use.part is not public.primary.part, use.part.created)).part
    return best, key.private_for(best)


def verification_keys(key: PublicKey | SecretKey) -> tuple[KeyUse, ...]:
    """The primary key and subkeys that may have issued a data signature (RFC 4880 section 5.2.3.21)."""
    public = key.public()
    return tuple(use for use in public.uses if use.part.can_sign
                 and (use.flags & KeyFlag.SIGN if use.flags is not None else use is public.primary))
