"""Key packets and the public-key operations on them (RFC 4880 sections 5.1, 5.5, 12.2; RFC 6637)."""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from server.crypto.errors import MalformedPacket, UnsupportedAlgorithm
from server.crypto.packets import HASH_NAME, SYM_KEY_SIZE, HashAlgo, PubKeyAlgo, SymAlgo, mpi, mpi_bytes, read_mpi
from server.crypto.s2k import read_protection, unprotect

ED25519_OID = bytes.fromhex("2b06010401da470f01")      # 1.3.6.1.4.1.11591.15.1 (RFC 9580 section 9.2)
CV25519_OID = bytes.fromhex("2b060104019755010501")    # 1.3.6.1.4.1.3029.1.5.1 (RFC 9580 section 9.2)
RSA_ALGOS = frozenset({PubKeyAlgo.RSA, PubKeyAlgo.RSA_ENCRYPT, PubKeyAlgo.RSA_SIGN})
PREHASH = {HashAlgo.SHA1: hashes.SHA1, HashAlgo.SHA256: hashes.SHA256, HashAlgo.SHA384: hashes.SHA384,
           HashAlgo.SHA512: hashes.SHA512, HashAlgo.SHA224: hashes.SHA224}
ANONYMOUS_SENDER = b"Anonymous Sender    "                # RFC 6637 section 8
EC_CURVES = {                                              # RFC 6637 section 11, RFC 9580 section 9.2
    bytes.fromhex("2a8648ce3d030107"): ec.SECP256R1,
    bytes.fromhex("2b81040022"): ec.SECP384R1,
    bytes.fromhex("2b81040023"): ec.SECP521R1,
    bytes.fromhex("2b2403030208010107"): ec.BrainpoolP256R1,
    bytes.fromhex("2b240303020801010b"): ec.BrainpoolP384R1,
    bytes.fromhex("2b240303020801010d"): ec.BrainpoolP512R1,
}


@dataclass(frozen=True)
class ElGamalPublic:
    """An Elgamal encryption key (p, g, y), which cryptography does not implement (RFC 4880 section 5.5.2)."""

    p: int
    g: int
    y: int


@dataclass(frozen=True)
class ElGamalPrivate:
    """The Elgamal secret exponent x with its public key (RFC 4880 section 5.5.3)."""

    public: ElGamalPublic
    x: int = field(repr=False)


@dataclass(frozen=True)
class KeyPart:
    """A v4 public key or subkey packet body and what it means (RFC 4880 section 5.5.2)."""

    algorithm: int
    created: int
    body: bytes
    public: object = field(repr=False)            # cryptography public key, None when unsupported
    kdf: tuple[int, int] | None = None             # ECDH (hash, cipher) of RFC 6637 section 9
    curve: bytes | None = None                     # curve OID of ECC keys (RFC 6637 section 9)

    @property
    def fingerprint(self) -> bytes:
        """SHA-1 of 0x99, length and body (RFC 4880 section 12.2)."""
        return hashlib.sha1(hash_material(self.body)).digest()

    @property
    def key_id(self) -> bytes:
        """The low 64 bits of the fingerprint (RFC 4880 section 12.2)."""
        return self.fingerprint[-8:]

    @property
    def can_encrypt(self) -> bool:
        """True for RSA, Elgamal and ECDH keys on curves we know, which we can encrypt to."""
        return self.public is not None and self.algorithm in (PubKeyAlgo.RSA, PubKeyAlgo.RSA_ENCRYPT,
                                                              PubKeyAlgo.ECDH, PubKeyAlgo.ELGAMAL)

    @property
    def can_sign(self) -> bool:
        """True for RSA, DSA, ECDSA and Ed25519 keys, whose signatures we can verify."""
        return self.public is not None and self.algorithm in (PubKeyAlgo.RSA, PubKeyAlgo.RSA_SIGN,
                                                              PubKeyAlgo.EDDSA, PubKeyAlgo.DSA, PubKeyAlgo.ECDSA)


def hash_material(body: bytes) -> bytes:
    """0x99, two-octet length, key body: how a key enters a hash (RFC 4880 sections 5.2.4, 12.2)."""
    return b"\x99" + len(body).to_bytes(2, "big") + bytes(body)


def _read_oid(body: memoryview, pos: int) -> tuple[bytes, int]:
    if pos >= len(body) or body[pos] in (0, 0xFF) or pos + 1 + body[pos] > len(body):
        raise MalformedPacket("bad curve OID in key packet")
    return bytes(body[pos + 1:pos + 1 + body[pos]]), pos + 1 + body[pos]


def _point(value: int) -> bytes:
    """The 32 octets of a 0x40-prefixed native curve point (RFC 9580 section 5.5.5.5)."""
    raw = value.to_bytes(33, "big") if value.bit_length() <= 264 else b""
    if len(raw) != 33 or raw[0] != 0x40:
        raise MalformedPacket("bad curve point")
    return raw[1:]


def parse_public(body: bytes | memoryview) -> tuple[KeyPart, int]:
    """(key part, end of public fields) of a v4 key packet body (RFC 4880 section 5.5.2, RFC 6637 section 9)."""
    view = memoryview(body)
    if len(view) < 6:
        raise MalformedPacket("truncated key packet")
    if view[0] != 4:
        raise UnsupportedAlgorithm(f"unsupported key packet version {view[0]}")
    created = int.from_bytes(view[1:5], "big")
    algorithm = view[5]
    pos = 6
    public: object = None
    kdf = oid = None
    if algorithm in RSA_ALGOS:
        n, pos = read_mpi(view, pos)
        e, pos = read_mpi(view, pos)
        try:
            public = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as exc:
            raise MalformedPacket("bad RSA public key") from exc
    elif algorithm == PubKeyAlgo.DSA:
        values = []
        for _ in range(4):
            value, pos = read_mpi(view, pos)
            values.append(value)
        p, q, g, y = values
        try:
            public = dsa.DSAPublicNumbers(y, dsa.DSAParameterNumbers(p, q, g)).public_key()
        except ValueError:
            public = None  # a DSA size OpenSSL refuses: keep the key, never use it
    elif algorithm == PubKeyAlgo.ELGAMAL:
        values = []
        for _ in range(3):
            value, pos = read_mpi(view, pos)
            values.append(value)
        public = ElGamalPublic(*values) if values[0].bit_length() >= 1024 else None
    elif algorithm in (PubKeyAlgo.EDDSA, PubKeyAlgo.ECDH, PubKeyAlgo.ECDSA):
        oid, pos = _read_oid(view, pos)
        point, pos = read_mpi(view, pos)
        if algorithm == PubKeyAlgo.ECDH:
            if pos + 4 > len(view) or view[pos] != 3 or view[pos + 1] != 1:
                raise MalformedPacket("bad ECDH KDF parameters")
            kdf = (view[pos + 2], view[pos + 3])
            pos += 4
            if oid == CV25519_OID:
                public = X25519PublicKey.from_public_bytes(_point(point))
        if algorithm == PubKeyAlgo.EDDSA and oid == ED25519_OID:
            public = Ed25519PublicKey.from_public_bytes(_point(point))
        elif algorithm in (PubKeyAlgo.ECDH, PubKeyAlgo.ECDSA) and oid in EC_CURVES:
            public = _ec_public(oid, point)
    else:
        pos = len(view)  # unknown algorithm: keep the packet, never use it
    if pos > len(view):
        raise MalformedPacket("truncated key packet")
    return KeyPart(algorithm, created, bytes(view[:pos]), public, kdf, oid), pos


def _ec_public(oid: bytes, point: int) -> ec.EllipticCurvePublicKey:
    """A SEC1 uncompressed point (0x04 || x || y) on a named curve (RFC 6637 section 6)."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(EC_CURVES[oid](), point.to_bytes(
            (point.bit_length() + 7) // 8, "big"))
    except ValueError as exc:
        raise MalformedPacket("bad elliptic curve point") from exc


def rsa_public_body(key: rsa.RSAPublicKey, created: int, algorithm: int = PubKeyAlgo.RSA) -> bytes:
    """The body of a v4 RSA public key packet (RFC 4880 section 5.5.2)."""
    numbers = key.public_numbers()
    return bytes([4]) + created.to_bytes(4, "big") + bytes([algorithm]) + mpi(numbers.n) + mpi(numbers.e)


def _checksum(data: bytes | memoryview) -> bytes:
    return (sum(data) & 0xFFFF).to_bytes(2, "big")


def parse_secret(body: bytes | memoryview, passphrase: bytes | None = None) -> tuple[KeyPart, object | None, bytes]:
    """(key part, private key or None for a gpg stub, unprotected packet body) of a v4 secret key packet.

    Material is plain (S2K usage 0) or protected with an AES/S2K passphrase (usage 254/255), RFC 4880 5.5.3.
    """
    part, pos = parse_public(body)
    view = memoryview(body)
    if pos >= len(view):
        raise MalformedPacket("truncated secret key packet")
    if view[pos] == 0:
        secret, checksum = view[pos + 1:len(view) - 2], bytes(view[len(view) - 2:])
        if len(view) - pos < 3 or _checksum(secret) != checksum:
            raise MalformedPacket("secret key checksum mismatch")
    else:
        protection, start = read_protection(view, pos)
        if protection.is_stub:
            return part, None, bytes(view)
        secret = unprotect(protection, view[start:], passphrase)
    values, at = [], 0
    while at < len(secret):
        value, at = read_mpi(secret, at)
        values.append(value)
    plain = bytes(secret)
    return part, _private_key(part, values), part.body + b"\x00" + plain + _checksum(plain)


def _private_key(part: KeyPart, values: list[int]) -> object:
    """Rebuild the cryptography private key from the secret MPIs (RFC 4880 section 5.5.3, RFC 6637 section 9)."""
    try:
        if part.algorithm in RSA_ALGOS and len(values) == 4:
            d, p, q, _u = values
            public = part.public.public_numbers()
            return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public).private_key()
        if part.algorithm == PubKeyAlgo.DSA and part.public is not None and len(values) == 1:
            return dsa.DSAPrivateNumbers(values[0], part.public.public_numbers()).private_key()
        if part.algorithm == PubKeyAlgo.ELGAMAL and part.public is not None and len(values) == 1:
            return ElGamalPrivate(part.public, values[0])
        if part.algorithm == PubKeyAlgo.EDDSA and part.public is not None and len(values) == 1:
            return Ed25519PrivateKey.from_private_bytes(values[0].to_bytes(32, "big"))
        if part.algorithm == PubKeyAlgo.ECDH and part.curve == CV25519_OID and len(values) == 1:
            return X25519PrivateKey.from_private_bytes(values[0].to_bytes(32, "big")[::-1])
        if part.algorithm in (PubKeyAlgo.ECDH, PubKeyAlgo.ECDSA) and part.public is not None and len(values) == 1:
            return ec.derive_private_key(values[0], EC_CURVES[part.curve]())
    except (ValueError, OverflowError) as exc:
        raise MalformedPacket("bad secret key material") from exc
    raise UnsupportedAlgorithm(f"unsupported secret key algorithm {part.algorithm}")


def rsa_secret_body(key: rsa.RSAPrivateKey, public_body: bytes) -> bytes:
    """An unprotected v4 RSA secret key packet body, p < q, u = p^-1 mod q (RFC 4880 section 5.5.3)."""
    numbers = key.private_numbers()
    p, q = sorted((numbers.p, numbers.q))
    secret = mpi(numbers.d) + mpi(p) + mpi(q) + mpi(pow(p, -1, q))
    return public_body + b"\x00" + secret + _checksum(secret)


def signing_hash(part: KeyPart) -> int:
    """SHA-256, or SHA-512 for ECDSA curves above 256 bits, which need a hash as long (RFC 6637 section 12)."""
    if part.algorithm == PubKeyAlgo.ECDSA and part.public.curve.key_size > 256:
        return HashAlgo.SHA512
    return HashAlgo.SHA256


def sign_digest(private: object, algorithm: int, hash_algo: int, digest: bytes) -> bytes:
    """The signature MPIs over ``digest`` (RFC 4880 section 5.2.2, RFC 9580 section 5.2.3.3)."""
    if algorithm in RSA_ALGOS:
        sig = private.sign(digest, padding.PKCS1v15(), Prehashed(PREHASH[hash_algo]()))
        return mpi(int.from_bytes(sig, "big"))
    if algorithm == PubKeyAlgo.EDDSA:
        sig = private.sign(digest)
        return mpi_bytes(sig[:32]) + mpi_bytes(sig[32:])
    if algorithm == PubKeyAlgo.DSA:
        r, s = decode_dss_signature(private.sign(digest, Prehashed(PREHASH[hash_algo]())))
        return mpi(r) + mpi(s)
    if algorithm == PubKeyAlgo.ECDSA:
        r, s = decode_dss_signature(private.sign(digest, ec.ECDSA(Prehashed(PREHASH[hash_algo]()))))
        return mpi(r) + mpi(s)
    raise UnsupportedAlgorithm(f"cannot sign with algorithm {algorithm}")


def read_signature_values(algorithm: int, data: bytes | memoryview) -> tuple[int, ...]:
    """The algorithm-specific MPIs at the end of a signature packet (RFC 4880 section 5.2.2)."""
    pos, values = 0, []
    count = 1 if algorithm in RSA_ALGOS else 2   # DSA, ECDSA, EdDSA: r and s
    for _ in range(count):
        value, pos = read_mpi(data, pos)
        values.append(value)
    return tuple(values)


def verify_digest(part: KeyPart, hash_algo: int, digest: bytes, values: tuple[int, ...]) -> bool:
    """True when ``values`` sign ``digest`` under ``part`` (RFC 4880 section 5.2.4)."""
    try:
        if part.algorithm in RSA_ALGOS and part.public is not None:
            size = (part.public.key_size + 7) // 8
            part.public.verify(values[0].to_bytes(size, "big"), digest, padding.PKCS1v15(),
                               Prehashed(PREHASH[hash_algo]()))
            return True
        if part.algorithm == PubKeyAlgo.EDDSA and part.public is not None:
            part.public.verify(values[0].to_bytes(32, "big") + values[1].to_bytes(32, "big"), digest)
            return True
        if part.algorithm == PubKeyAlgo.DSA and part.public is not None:
            part.public.verify(encode_dss_signature(*values), digest, Prehashed(PREHASH[hash_algo]()))
            return True
        if part.algorithm == PubKeyAlgo.ECDSA and part.public is not None:
            part.public.verify(encode_dss_signature(*values), digest, ec.ECDSA(Prehashed(PREHASH[hash_algo]())))
            return True
    except (InvalidSignature, OverflowError, ValueError, IndexError, KeyError):
        return False
    return False


def _session_plain(sym: int, key: bytes) -> bytes:
    """Algorithm octet, key, two-octet checksum (RFC 4880 section 5.1)."""
    return bytes([sym]) + key + _checksum(key)


def _ecdh_kek(part: KeyPart, shared: bytes) -> bytes:
    """KDF(Z, Param) of RFC 6637 sections 7 and 8; Z is the shared x coordinate (native X25519 output)."""
    hash_algo, kek_algo = part.kdf
    if hash_algo not in HASH_NAME or kek_algo not in SYM_KEY_SIZE:
        raise UnsupportedAlgorithm("unsupported ECDH KDF parameters")
    param = (bytes([len(part.curve)]) + part.curve + bytes([PubKeyAlgo.ECDH, 3, 1, hash_algo, kek_algo])
             + ANONYMOUS_SENDER + part.fingerprint)
    digest = hashlib.new(HASH_NAME[hash_algo], b"\x00\x00\x00\x01" + shared + param).digest()
    return digest[:SYM_KEY_SIZE[kek_algo]]


def encrypt_session_key(part: KeyPart, sym: int, key: bytes) -> bytes:
    """A v3 public-key encrypted session key packet body (RFC 4880 section 5.1, RFC 6637 section 8)."""
    head = bytes([3]) + part.key_id + bytes([part.algorithm])
    plain = _session_plain(sym, key)
    if part.algorithm in (PubKeyAlgo.RSA, PubKeyAlgo.RSA_ENCRYPT):
        return head + mpi(int.from_bytes(part.public.encrypt(plain, padding.PKCS1v15()), "big"))
    if part.algorithm == PubKeyAlgo.ELGAMAL and part.public is not None:
        return head + _elgamal_encrypt(part.public, plain)
    if part.algorithm == PubKeyAlgo.ECDH and part.public is not None:
        if part.curve == CV25519_OID:
            ephemeral = X25519PrivateKey.generate()
            shared = ephemeral.exchange(part.public)
            point = b"\x40" + ephemeral.public_key().public_bytes_raw()
        else:
            ephemeral = ec.generate_private_key(part.public.curve)
            shared = ephemeral.exchange(ec.ECDH(), part.public)
            point = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        pad = 8 - len(plain) % 8
        wrapped = aes_key_wrap(_ecdh_kek(part, shared), plain + bytes([pad]) * pad)
        return head + mpi_bytes(point) + bytes([len(wrapped)]) + wrapped
    raise UnsupportedAlgorithm(f"cannot encrypt to algorithm {part.algorithm}")


def decrypt_session_key(part: KeyPart, private: object, data: bytes | memoryview) -> tuple[int, bytes] | None:
    """(cipher, session key) from the algorithm fields of a PKESK, or None when it does not open."""
    try:
        if part.algorithm in (PubKeyAlgo.RSA, PubKeyAlgo.RSA_ENCRYPT):
            value, _ = read_mpi(data, 0)
            size = (private.key_size + 7) // 8
            plain = private.decrypt(value.to_bytes(size, "big"), padding.PKCS1v15())
        elif part.algorithm == PubKeyAlgo.ELGAMAL:
            plain = _elgamal_decrypt(private, data)
            if plain is None:
                return None
        elif part.algorithm == PubKeyAlgo.ECDH:
            value, pos = read_mpi(data, 0)
            size = data[pos]
            wrapped = bytes(data[pos + 1:pos + 1 + size])
            if part.curve == CV25519_OID:
                shared = private.exchange(X25519PublicKey.from_public_bytes(_point(value)))
            else:
                shared = private.exchange(ec.ECDH(), _ec_public(part.curve, value))
            padded = aes_key_unwrap(_ecdh_kek(part, shared), wrapped)
            pad = padded[-1]
            if not 1 <= pad <= 8 or padded[-pad:] != bytes([pad]) * pad:
                return None
            plain = padded[:-pad]
        else:
            return None
    except (ValueError, IndexError, OverflowError, InvalidUnwrap, MalformedPacket):
        return None
    if len(plain) < 3:
        return None
    sym, key, check = plain[0], plain[1:-2], plain[-2:]
    if sym not in SYM_KEY_SIZE or len(key) != SYM_KEY_SIZE[sym] or _checksum(key) != check:
        return None
    return SymAlgo(sym), key


def _eme_pkcs1_encode(message: bytes, size: int) -> int:
    """EME-PKCS1-v1_5 encoding: 00 02 nonzero padding 00 message (RFC 4880 section 13.1.1)."""
    pad_len = size - len(message) - 3
    if pad_len < 8:
        raise UnsupportedAlgorithm("Elgamal key too small")
    pad = bytearray()
    while len(pad) < pad_len:
        pad += os.urandom(pad_len).replace(b"\x00", b"")
    return int.from_bytes(b"\x00\x02" + bytes(pad[:pad_len]) + b"\x00" + message, "big")


def _elgamal_encrypt(key: ElGamalPublic, plain: bytes) -> bytes:
    """MPIs g^k mod p and m*y^k mod p with a fresh random k (RFC 4880 sections 5.1, 13.1)."""
    m = _eme_pkcs1_encode(plain, (key.p.bit_length() + 7) // 8)
    k = secrets.randbelow(key.p - 3) + 2
    return mpi(pow(key.g, k, key.p)) + mpi(m * pow(key.y, k, key.p) % key.p)


def _elgamal_decrypt(private: ElGamalPrivate, data: bytes | memoryview) -> bytes | None:
    """m = c2 / c1^x mod p, then EME-PKCS1-v1_5 decoding (RFC 4880 sections 5.1, 13.1.2)."""
    c1, pos = read_mpi(data, 0)
    c2, _ = read_mpi(data, pos)
    p = private.public.p
    if not (1 < c1 < p and 0 < c2 < p):
        return None
    encoded = (c2 * pow(c1, p - 1 - private.x, p) % p).to_bytes((p.bit_length() + 7) // 8, "big")
    separator = encoded.find(b"\x00", 2)
    if encoded[:2] != b"\x00\x02" or separator < 10:
        return None
    return encoded[separator + 1:]


def random_session_key(sym: int = SymAlgo.AES256) -> bytes:
    """A fresh session key for ``sym`` (RFC 4880 section 5.1)."""
    return os.urandom(SYM_KEY_SIZE[sym])
