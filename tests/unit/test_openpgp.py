"""The pure OpenPGP core: keys, armor, messages, detached signatures and every failure cause (RFC 4880)."""

from __future__ import annotations

import os
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.crypto import (BadSignature, InvalidKey, KeyExpired, KeyRevoked, MalformedPacket, NotEncrypted,
                           NotSigned, TamperedMessage, UnknownSender, UnsupportedAlgorithm, WrongRecipientKey,
                           decrypt_and_verify, encrypt_and_sign, encryption_key, export_public_key, export_secret_key,
                           generate_key, import_public_key, import_secret_key, sign_detached, verify_detached)
from server.crypto.armor import MESSAGE, SIGNATURE, armor, crc24, crc24_reference, dearmor
from server.crypto.keys import import_public_keys, signing_key
from server.crypto.material import encrypt_session_key, random_session_key
from server.crypto.openpgp import MDC_HEADER, _cipher, _literal_header, _mdc_hash
from server.crypto.packets import (CompressAlgo, HashAlgo, KeyFlag, SigType, SymAlgo, Tag, encode_length, header,
                                   packet, packet_partial, read_packets)
from server.crypto.signatures import key_hasher, make_signature, new_hash
from server.errors import ErrorKind, ServerError


@pytest.fixture(scope="module")
def alice():
    return generate_key("Alice Sender <alice@klinik-a.example>")


@pytest.fixture(scope="module")
def bob():
    return generate_key("Bob Receiver <bob@praxis-b.example>", bits=2048)


@pytest.fixture(scope="module")
def mallory():
    return generate_key("Mallory <mallory@evil.example>", bits=2048)


def _binary(message: bytes) -> bytes:
    return dearmor(message)[1]


def _seal(plain: bytes, recipient, *, sym: int = SymAlgo.AES256, mdc: bool = True) -> bytes:
    """Encrypt arbitrary inner packets the way encrypt_and_sign does (for crafted negative cases)."""
    key = random_session_key(sym)
    pkesk = packet(Tag.PKESK, encrypt_session_key(encryption_key(recipient), sym, key))
    prefix = os.urandom(16)
    prefix += prefix[-2:]
    encryptor = _cipher(sym, key).encryptor()
    if not mdc:
        return pkesk + packet(Tag.SED, encryptor.update(prefix + plain) + encryptor.finalize())
    body = encryptor.update(prefix + plain + MDC_HEADER + _mdc_hash(prefix, [plain])) + encryptor.finalize()
    return pkesk + packet(Tag.SEIPD, b"\x01" + body)


def _signed_literal(data: bytes, signer, *, signed_data: bytes | None = None) -> bytes:
    part, private = signing_key(signer)
    hasher = new_hash(HashAlgo.SHA256)
    hasher.update(data if signed_data is None else signed_data)
    sig = make_signature(sig_type=SigType.BINARY, signer=part, private=private, hash_algo=HashAlgo.SHA256,
                         hasher=hasher)
    return _literal_header(len(data), b"x.dcm", 0) + data + packet(Tag.SIGNATURE, sig)


# --- keys -------------------------------------------------------------------------------------------------


def test_generated_key_has_gpg_shape(alice):
    public = alice.public()
    assert public.user_ids == ("Alice Sender <alice@klinik-a.example>",)
    assert public.primary.flags == KeyFlag.CERTIFY | KeyFlag.SIGN
    assert [s.flags for s in public.subkeys] == [KeyFlag.ENCRYPT_COMMS | KeyFlag.ENCRYPT_STORAGE]
    assert public.primary.part.public.key_size == 3072
    assert len(public.fingerprint) == 40 and public.fingerprint.endswith(public.key_id)
    assert encryption_key(public) is public.subkeys[0].part


def test_key_export_import_round_trip(alice):
    public_block = export_public_key(alice)
    secret_block = export_secret_key(alice)
    assert public_block.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert secret_block.startswith(b"-----BEGIN PGP PRIVATE KEY BLOCK-----")
    public = import_public_key(public_block)
    secret = import_secret_key(secret_block)
    assert public.fingerprint == secret.fingerprint == alice.fingerprint
    assert all(p.tag not in (Tag.SECRET_KEY, Tag.SECRET_SUBKEY) for p in read_packets(public.packets))
    assert export_public_key(secret) == public_block
    # S2K usage 0: material stored unencrypted right after the public fields (RFC 4880 section 5.5.3)
    first = next(read_packets(dearmor(secret_block)[1]))
    assert first.tag == Tag.SECRET_KEY and first.body[len(alice.public().primary.part.body)] == 0


def test_keyring_with_several_keys(alice, bob):
    ring = dearmor(export_public_key(alice))[1] + dearmor(export_public_key(bob))[1]
    assert [k.fingerprint for k in import_public_keys(ring)] == [alice.fingerprint, bob.fingerprint]
    with pytest.raises(InvalidKey):
        import_public_key(ring)


def test_import_rejects_secret_from_public_block_and_garbage(alice):
    with pytest.raises(InvalidKey):
        import_secret_key(export_public_key(alice))
    with pytest.raises(InvalidKey):
        import_public_key(armor(SIGNATURE, b""))
    with pytest.raises(MalformedPacket):
        import_public_key(b"\x99\x01")


def test_key_with_broken_self_signature_is_invalid(alice):
    packets = list(read_packets(alice.public().packets))
    sig = bytearray(packets[2].body)
    sig[-5] ^= 0xFF
    blob = b"".join(packet(p.tag, bytes(sig) if i == 2 else bytes(p.body)) for i, p in enumerate(packets[:3]))
    with pytest.raises(InvalidKey):
        import_public_key(blob)


def test_expired_key_is_refused(alice):
    old = generate_key("Old <old@example.org>", bits=2048, created=int(time.time()) - 1000, expires_in=10)
    with pytest.raises(KeyExpired):
        encryption_key(old)
    with pytest.raises(KeyExpired):
        encrypt_and_sign(b"x", [old], alice)
    with pytest.raises(KeyExpired):
        sign_detached(b"x", old)
    assert encryption_key(old, now=old.public().primary.part.created + 5)
    signed_while_valid = encrypt_and_sign(b"x", [alice], old, now=old.public().primary.part.created + 5)
    with pytest.raises(KeyExpired):
        decrypt_and_verify(signed_while_valid, [alice], [old])


def _revoked(key):
    primary = key.public().primary.part
    part, private = primary, key.private_for(primary)
    revocation = make_signature(sig_type=SigType.KEY_REVOCATION, signer=part, private=private,
                                hash_algo=HashAlgo.SHA256, hasher=key_hasher(HashAlgo.SHA256, primary))
    packets = list(read_packets(key.public().packets))
    return import_public_key(packet(packets[0].tag, bytes(packets[0].body)) + packet(Tag.SIGNATURE, revocation)
                             + b"".join(packet(p.tag, bytes(p.body)) for p in packets[1:]))


def test_revoked_key_is_refused(alice, bob):
    revoked = _revoked(bob)
    assert revoked.primary.revoked
    with pytest.raises(KeyRevoked):
        encrypt_and_sign(b"x", [revoked], alice)
    message = encrypt_and_sign(b"x", [alice], bob)
    with pytest.raises(KeyRevoked):
        decrypt_and_verify(message, [alice], [revoked])


# --- armor ------------------------------------------------------------------------------------------------


@given(st.binary(max_size=20000))
@settings(max_examples=60)
def test_crc24_matches_rfc_sample_code(data):
    assert crc24(data) == crc24_reference(data)


def test_crc24_large_inputs_cross_the_folding_cycle():
    data = os.urandom((1 << 23) + 12345)
    assert crc24(data) == crc24_reference(data)
    assert crc24(b"") == 0xB704CE


@pytest.mark.parametrize("size", [4097, 13_001, 104_087 // 8 + 1, 40_000, 123_457, 400_003, (1 << 20) + 1])
@pytest.mark.parametrize("lead", [b"", b"\0" * 20_000, b"\xff" * 7])
def test_crc24_exact_across_the_sparse_folds(size, lead):
    data = lead + os.urandom(size)
    assert crc24(data) == crc24_reference(data)


def test_crc24_sparse_exponents_are_what_they_claim():
    from server.crypto.armor import _SPARSE, _xpow

    assert list(_SPARSE) == sorted(_SPARSE)
    for k, a, b in _SPARSE:
        assert _xpow(k) == 1 | 1 << a | 1 << b
    assert all(later[0] < 2 * earlier[0] for earlier, later in zip(_SPARSE, _SPARSE[1:]))


@given(st.binary(max_size=3000), st.sampled_from([MESSAGE, SIGNATURE]))
def test_armor_round_trip(data, kind):
    block = armor(kind, data, headers=(("Comment", "telerad"),))
    assert dearmor(block) == (kind, data)
    assert dearmor(block.replace(b"\n", b"\r\n")) == (kind, data)
    assert max(len(line) for line in block.split(b"\n")) <= 76


def test_armor_checksum_mismatch_and_truncation():
    block = armor(MESSAGE, b"some packet bytes, long enough to have lines" * 3)
    lines = block.split(b"\n")
    lines[2] = lines[2][:-4] + (b"AAAA" if lines[2][-4:] != b"AAAA" else b"BBBB")
    with pytest.raises(MalformedPacket):
        dearmor(b"\n".join(lines))
    with pytest.raises(MalformedPacket):
        dearmor(block[: len(block) // 2])


# --- packets ----------------------------------------------------------------------------------------------


@given(st.integers(0, 2**32 - 1))
def test_new_format_lengths(length):
    encoded = encode_length(length)
    assert len(encoded) == (1 if length < 192 else 2 if length < 8384 else 5)


@given(st.binary(max_size=5000), st.integers(9, 12))
def test_partial_body_lengths_round_trip(body, power):
    pkt = next(read_packets(packet_partial(Tag.LITERAL, body, power) + packet(Tag.MARKER, b"PGP")))
    assert (pkt.tag, bytes(pkt.body)) == (Tag.LITERAL, body)


@pytest.mark.parametrize("length", [0, 191, 192, 8383, 8384, 70000])
def test_old_format_headers(length):
    body = os.urandom(length)
    for length_type, size in ((0, 1), (1, 2), (2, 4)):
        if length >= 1 << (8 * size):
            continue
        old = bytes([0x80 | (Tag.LITERAL << 2) | length_type]) + length.to_bytes(size, "big") + body
        assert bytes(next(read_packets(old)).body) == body
    indeterminate = bytes([0x80 | (Tag.LITERAL << 2) | 3]) + body
    assert bytes(next(read_packets(indeterminate)).body) == body


# --- messages ---------------------------------------------------------------------------------------------


def test_round_trip_reports_file_signer_and_time(alice, bob):
    data = b"DICM" * 5000
    message = encrypt_and_sign(data, [bob], alice, filename=b"1.2.3.dcm")
    assert message.startswith(b"-----BEGIN PGP MESSAGE-----")
    result = decrypt_and_verify(message, [bob], [bob, alice])
    assert (result.data, result.filename, result.signer_fingerprint) == (data, b"1.2.3.dcm", alice.fingerprint)
    assert abs(result.signature_time.timestamp() - time.time()) < 60


def test_message_structure_is_what_gpg_makes(alice, bob):
    binary = _binary(encrypt_and_sign(b"a" * 10000, [bob, alice], alice))
    tags = [p.tag for p in read_packets(binary)]
    assert tags == [Tag.PKESK, Tag.PKESK, Tag.SEIPD]
    pkesk = next(read_packets(binary))
    assert pkesk.body[0] == 3 and bytes(pkesk.body[1:9]) == encryption_key(bob).key_id
    for key in (alice, bob):
        assert decrypt_and_verify(binary, [key], [alice]).data == b"a" * 10000


@pytest.mark.parametrize("compress", [True, False])
def test_compression_choice(alice, bob, compress):
    compressible, random_data = b"\0" * 100000, os.urandom(100000)
    small = len(_binary(encrypt_and_sign(compressible, [bob], alice, compress=compress)))
    big = len(_binary(encrypt_and_sign(random_data, [bob], alice, compress=compress)))
    assert (small < 10000) is compress
    assert big > 100000
    for data in (compressible, random_data):
        assert decrypt_and_verify(encrypt_and_sign(data, [bob], alice, compress=compress), [bob], [alice]).data == data


@given(st.one_of(st.binary(max_size=2000),
                 st.sampled_from([0, 1, 191, 192, 511, 512, 513, 8191, 8192, 8383, 8384, 65536]).map(os.urandom)))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_round_trip_payload_sizes(alice, bob, data):
    message = encrypt_and_sign(data, [bob], alice, compress=len(data) % 2 == 0)
    assert decrypt_and_verify(message, [bob], [alice]).data == data


def _repacketize(binary: bytes, power: int, *, old: bool = False) -> bytes:
    out = []
    for pkt in read_packets(binary):
        body = bytes(pkt.body)
        if pkt.tag == Tag.SEIPD and not old:
            out.append(packet_partial(pkt.tag, body, power))
        elif old and pkt.tag < 16:
            out.append(bytes([0x80 | (pkt.tag << 2) | 2]) + len(body).to_bytes(4, "big") + body)
        else:
            out.append(packet(pkt.tag, body))
    return b"".join(out)


@given(st.integers(0, 20000), st.integers(9, 13))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_partial_lengths_and_old_headers_decrypt(alice, bob, size, power):
    data = os.urandom(size)
    binary = _binary(encrypt_and_sign(data, [bob], alice))
    assert decrypt_and_verify(_repacketize(binary, power), [bob], [alice]).data == data
    assert decrypt_and_verify(_repacketize(binary, power, old=True), [bob], [alice]).data == data


@pytest.mark.parametrize("algo", [CompressAlgo.NONE, CompressAlgo.ZIP, CompressAlgo.ZLIB, CompressAlgo.BZIP2])
def test_inner_compression_algorithms(alice, bob, algo):
    import bz2
    data = b"pixel data " * 1000
    inner = _signed_literal(data, alice)
    packed = {CompressAlgo.NONE: inner, CompressAlgo.ZLIB: zlib.compress(inner),
              CompressAlgo.BZIP2: bz2.compress(inner)}.get(algo)
    if algo == CompressAlgo.ZIP:
        deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
        packed = deflater.compress(inner) + deflater.flush()
    message = _seal(packet(Tag.COMPRESSED, bytes([algo]) + packed), bob)
    assert decrypt_and_verify(message, [bob], [alice]).data == data


def test_aes128_session(alice, bob):
    message = _seal(_signed_literal(b"short", alice), bob, sym=SymAlgo.AES128)
    assert decrypt_and_verify(message, [bob], [alice]).data == b"short"


# --- failures ---------------------------------------------------------------------------------------------


def test_every_failure_is_a_server_error_with_the_right_kind():
    security = [WrongRecipientKey, TamperedMessage, UnknownSender, NotSigned, BadSignature, KeyExpired, KeyRevoked]
    invalid = [NotEncrypted, MalformedPacket, InvalidKey]
    for cls in security:
        assert isinstance(cls(), ServerError) and cls().kind is ErrorKind.SECURITY
    for cls in invalid:
        assert isinstance(cls(), ServerError) and cls().kind is ErrorKind.INVALID
    assert WrongRecipientKey().message == "wrong recipient key"
    assert UnknownSender().message == "unknown sender"


@pytest.mark.parametrize("where", [40, 200, -30, -3])
def test_tampered_ciphertext_fails_mdc(alice, bob, where):
    binary = bytearray(_binary(encrypt_and_sign(os.urandom(3000), [bob], alice)))
    binary[where] ^= 0x01
    with pytest.raises((TamperedMessage, WrongRecipientKey)) as info:
        decrypt_and_verify(bytes(binary), [bob], [alice])
    pkesk_len = len(bytes(next(read_packets(bytes(binary))).body)) + 3
    if where < 0 or where > pkesk_len + 10:
        assert isinstance(info.value, TamperedMessage)


def test_truncated_message_is_malformed(alice, bob):
    message = encrypt_and_sign(os.urandom(3000), [bob], alice)
    binary = _binary(message)
    for cut in (1, 100, len(binary) - 1):
        with pytest.raises(MalformedPacket):
            decrypt_and_verify(binary[:cut], [bob], [alice])
    with pytest.raises(MalformedPacket):
        decrypt_and_verify(message[:-200], [bob], [alice])


def test_wrong_recipient_key(alice, bob, mallory):
    with pytest.raises(WrongRecipientKey):
        decrypt_and_verify(encrypt_and_sign(b"x", [bob], alice), [mallory], [alice])


def test_unknown_signer(alice, bob, mallory):
    with pytest.raises(UnknownSender) as info:
        decrypt_and_verify(encrypt_and_sign(b"x", [bob], mallory), [bob], [alice])
    assert not isinstance(info.value, NotSigned)


def test_not_signed(alice, bob):
    with pytest.raises(NotSigned):
        decrypt_and_verify(_seal(_literal_header(5, b"", 0) + b"hello", bob), [bob], [alice])


def test_bad_signature(alice, bob):
    message = _seal(_signed_literal(b"real data", alice, signed_data=b"other data"), bob)
    with pytest.raises(BadSignature):
        decrypt_and_verify(message, [bob], [alice])


def test_v3_signature_is_unsupported_not_missing(alice, bob):
    v3 = packet(Tag.SIGNATURE, bytes([3, 5, 0]) + bytes(4) + bytes(8) + bytes([1, 8]) + b"\0\0" + b"\x00\x08\x01")
    with pytest.raises(UnsupportedAlgorithm):
        decrypt_and_verify(_seal(_literal_header(2, b"", 0) + b"hi" + v3, bob), [bob], [alice])


def test_signature_checked_against_the_given_time(alice, bob):
    message = encrypt_and_sign(b"x", [bob], alice)
    later = int(time.time()) + 3600
    assert decrypt_and_verify(message, [bob], [alice], now=later).data == b"x"
    old = generate_key("Short <short@example.org>", bits=2048, expires_in=1800)
    signed = encrypt_and_sign(b"y", [bob], old)
    assert decrypt_and_verify(signed, [bob], [old]).data == b"y"
    with pytest.raises(KeyExpired):
        decrypt_and_verify(signed, [bob], [old], now=later)


def test_no_mdc_is_refused(alice, bob):
    with pytest.raises(TamperedMessage):
        decrypt_and_verify(_seal(_signed_literal(b"x", alice), bob, mdc=False), [bob], [alice])


def test_not_encrypted(alice, bob):
    signed_only = armor(MESSAGE, _signed_literal(b"clear", alice))
    with pytest.raises(NotEncrypted):
        decrypt_and_verify(signed_only, [bob], [alice])
    with pytest.raises(NotEncrypted):
        decrypt_and_verify(sign_detached(b"x", alice), [bob], [alice])
    with pytest.raises(NotEncrypted):
        decrypt_and_verify(export_public_key(alice), [bob], [alice])
    with pytest.raises(MalformedPacket):
        decrypt_and_verify(b"Hello, this is plain text", [bob], [alice])
    with pytest.raises(NotEncrypted):
        decrypt_and_verify(b"", [bob], [alice])


def test_inner_garbage_after_good_mdc_is_malformed(alice, bob):
    with pytest.raises(MalformedPacket):
        decrypt_and_verify(_seal(b"\x01\x02garbage", bob), [bob], [alice])
    with pytest.raises(MalformedPacket):
        decrypt_and_verify(_seal(header(Tag.COMPRESSED, 5) + b"\x02abcd", bob), [bob], [alice])


# --- detached signatures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [False, True])
def test_detached_signature(alice, mallory, text):
    entity = b"Content-Type: text/plain\n\nDICOM report\n"
    signature = sign_detached(entity, alice, text=text)
    assert signature.startswith(b"-----BEGIN PGP SIGNATURE-----")
    verified = verify_detached(entity, signature, [mallory, alice])
    assert verified.signer_fingerprint == alice.fingerprint
    if text:  # text signatures ignore the line-ending convention (RFC 4880 section 5.2.1)
        assert verify_detached(entity.replace(b"\n", b"\r\n"), signature, [alice])
    with pytest.raises(BadSignature):
        verify_detached(entity + b"tampered", signature, [alice])
    with pytest.raises(UnknownSender):
        verify_detached(entity, signature, [mallory])
    with pytest.raises(MalformedPacket):
        verify_detached(entity, signature[:60], [alice])


# --- robustness -------------------------------------------------------------------------------------------


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in edits:
        if not out:
            break
        where %= len(out)
        if kind == 0:
            out[where] = value
        elif kind == 1:
            del out[where:]
        else:
            out[where:where] = bytes([value])
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)


@given(EDITS, st.sampled_from(["message", "inner", "public", "secret", "signature"]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_damaged_input_raises_only_openpgp_errors(alice, bob, edits, target):
    """Whatever the damage, the caller sees an OpenPGPError (never IndexError & co.) or verified data."""
    from server.crypto import OpenPGPError
    samples = {
        "message": lambda: decrypt_and_verify(_mutate(_binary(encrypt_and_sign(b"x" * 300, [bob], alice)), edits),
                                              [bob], [alice]),
        "inner": lambda: decrypt_and_verify(_seal(_mutate(_signed_literal(b"y" * 300, alice), edits), bob),
                                            [bob], [alice]),
        "public": lambda: import_public_key(_mutate(_binary(export_public_key(bob)), edits)),
        "secret": lambda: import_secret_key(_mutate(_binary(export_secret_key(bob)), edits)),
        "signature": lambda: verify_detached(b"z", _mutate(_binary(sign_detached(b"z", alice)), edits), [alice]),
    }
    try:
        samples[target]()
    except OpenPGPError:
        pass


# --- passphrase protection (RFC 4880 sections 3.7, 5.5.3) -------------------------------------------------


@pytest.mark.parametrize("s2k_type, count", [(0, 0), (1, 0), (3, 1024), (3, 65011712)])
def test_s2k_derivation(s2k_type, count):
    import hashlib
    from server.crypto.s2k import Protection, derive_key
    salt, passphrase = (b"saltsalt" if s2k_type else b""), b"passphrase"
    protection = Protection(254, SymAlgo.AES256, s2k_type, HashAlgo.SHA1, salt, count, bytes(16))
    data = salt + passphrase
    stream = (data * (count // len(data) + 1))[:count] if s2k_type == 3 else data
    expected = hashlib.sha1(stream).digest() + hashlib.sha1(b"\0" + stream).digest()
    assert derive_key(protection, passphrase) == expected[:32]
