"""Interoperability of server.crypto with the real GnuPG 2.2 command line, both ways (RFC 4880, RFC 3156).

Each module run uses a throwaway ``--homedir`` (never ~/.gnupg); its gpg-agent is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from server.crypto import (BadSignature, InvalidKey, KeyExpired, KeyRevoked, KeyUnusable, NotEncrypted, NotSigned,
                           TamperedMessage, UnknownSender, WrongRecipientKey, decrypt_and_verify, encrypt_and_sign,
                           export_public_key, export_secret_key, generate_key, import_public_key, import_secret_key,
                           sign_detached, verify_detached)
from server.crypto.armor import dearmor
from server.crypto.packets import PubKeyAlgo

GPG = "/usr/bin/gpg"
pytestmark = pytest.mark.skipif(not os.path.exists(GPG), reason="GnuPG (/usr/bin/gpg) is not installed")

RSA_UID = "Gpg Rsa <gpg-rsa@site-c.example>"
ED_UID = "Gpg Ed <gpg-ed@site-d.example>"


class Gpg:
    """The gpg command line on a private home directory."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def run(self, *args: str, data: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [GPG, "--homedir", str(self.home), "--batch", "--yes", "--pinentry-mode", "loopback",
               "--passphrase", "", "--trust-model", "always", "--status-fd", "2", *args]
        result = subprocess.run(cmd, input=data, capture_output=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"gpg {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
        return result

    def status(self, result: subprocess.CompletedProcess, keyword: str) -> list[list[str]]:
        lines = result.stderr.decode(errors="replace").splitlines()
        return [line.split()[2:] for line in lines if line.startswith(f"[GNUPG:] {keyword} ")
                or line == f"[GNUPG:] {keyword}"]

    def fingerprints(self, who: str) -> list[str]:
        out = self.run("--with-colons", "--list-keys", who).stdout.decode()
        return [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")]


@pytest.fixture(scope="module")
def gpg():
    home = Path(tempfile.mkdtemp(prefix="gpg-"))   # short path: the agent socket lives here
    home.chmod(0o700)
    tool = Gpg(home)
    tool.run("--quick-gen-key", RSA_UID, "default", "default", "never")       # rsa3072 + rsa3072 subkey
    tool.run("--quick-gen-key", ED_UID, "future-default", "default", "never")  # ed25519 + cv25519 subkey
    yield tool
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def ours(gpg):
    key = generate_key("Telerad Bridge <bridge@site-a.example>")
    gpg.run("--import", data=export_secret_key(key))
    return key


@pytest.fixture(scope="module")
def gpg_rsa(gpg):
    return import_public_key(gpg.run("--armor", "--export", RSA_UID).stdout)


@pytest.fixture(scope="module")
def gpg_ed(gpg):
    return import_public_key(gpg.run("--armor", "--export", ED_UID).stdout)


def test_gpg_imports_our_key_with_our_fingerprints(gpg, ours):
    listing = gpg.run("--with-colons", "--list-secret-keys", ours.fingerprint).stdout.decode().splitlines()
    sec = next(line.split(":") for line in listing if line.startswith("sec:"))
    ssb = next(line.split(":") for line in listing if line.startswith("ssb:"))
    assert sec[2] == "3072" and "s" in sec[11] and "c" in sec[11]
    assert "e" in ssb[11]
    assert gpg.fingerprints(ours.fingerprint) == [ours.fingerprint,
                                                  ours.public().subkeys[0].part.fingerprint.hex().upper()]
    shown = gpg.run("--edit-key", ours.fingerprint, "showpref", "quit")
    prefs = (shown.stdout + shown.stderr).decode()
    assert "Cipher: AES256, AES, " in prefs and "SHA256, SHA512" in prefs and "ZLIB, ZIP, Uncompressed" in prefs


def test_we_parse_gpg_keys_with_gpg_fingerprints(gpg, gpg_rsa, gpg_ed):
    assert [gpg_rsa.fingerprint] + [s.part.fingerprint.hex().upper() for s in gpg_rsa.subkeys] == \
        gpg.fingerprints(RSA_UID)
    assert [gpg_ed.fingerprint] + [s.part.fingerprint.hex().upper() for s in gpg_ed.subkeys] == \
        gpg.fingerprints(ED_UID)
    assert gpg_ed.primary.part.algorithm == PubKeyAlgo.EDDSA
    assert [s.part.algorithm for s in gpg_ed.subkeys] == [PubKeyAlgo.ECDH]
    assert gpg_rsa.user_ids == (RSA_UID,) and gpg_ed.user_ids == (ED_UID,)


@pytest.mark.parametrize("recipient", ["ours", "gpg_rsa", "gpg_ed"])
@pytest.mark.parametrize("payload", [b"", b"DICM" * 30000, os.urandom(1 << 20)], ids=["empty", "text", "random"])
def test_gpg_decrypts_and_verifies_our_message(gpg, ours, recipient, payload, request):
    key = request.getfixturevalue(recipient)
    message = encrypt_and_sign(payload, [key], ours, filename=b"1.2.840.1.dcm")
    result = gpg.run("--decrypt", data=message)
    assert result.stdout == payload
    assert gpg.status(result, "VALIDSIG")[0][0] == ours.fingerprint
    assert gpg.status(result, "GOODSIG")[0][0] == ours.public().key_id
    assert gpg.status(result, "GOODMDC") == [[]]
    assert gpg.status(result, "DECRYPTION_OKAY") == [[]]
    assert gpg.status(result, "PLAINTEXT")[0][2] == "1.2.840.1.dcm"


GPG_OPTIONS = {
    "default": [],
    "no-compression": ["--compress-algo", "none"],
    "aes128": ["--cipher-algo", "AES128"],
    "zip": ["--compress-algo", "zip"],
    "bzip2": ["--compress-algo", "bzip2"],
    "sha512": ["--digest-algo", "SHA512"],
    "armor": ["--armor"],
    "textmode": ["--textmode"],
}


@pytest.mark.parametrize("signer_uid", [RSA_UID, ED_UID], ids=["rsa", "ed25519"])
@pytest.mark.parametrize("options", list(GPG_OPTIONS.values()), ids=list(GPG_OPTIONS))
def test_we_decrypt_and_verify_gpg_sign_encrypt(gpg, ours, gpg_rsa, gpg_ed, tmp_path, signer_uid, options):
    payload = os.urandom(300_000) + b"text " * 50_000
    if "--textmode" in options:
        payload = b"Befund: unauffaellig\n" * 20_000
    source = tmp_path / "study.dcm"
    source.write_bytes(payload)
    message = gpg.run("--local-user", signer_uid, "--recipient", ours.fingerprint, *options,
                      "--output", "-", "--sign", "--encrypt", str(source)).stdout
    result = decrypt_and_verify(message, [ours], [gpg_rsa, gpg_ed])
    if "--textmode" in options:  # text literal data travels with CRLF line ends (RFC 4880 section 5.9)
        payload = payload.replace(b"\n", b"\r\n")
    assert result.data == payload and result.filename == b"study.dcm"
    expected = gpg_rsa if signer_uid == RSA_UID else gpg_ed
    assert result.signer_fingerprint == expected.fingerprint


@pytest.mark.parametrize("size", [0, 1, 8191, 8192, 100_000, 2_000_000])
def test_we_decrypt_gpg_streamed_stdin_with_partial_lengths(gpg, ours, gpg_rsa, size):
    payload = os.urandom(size)
    message = gpg.run("--local-user", RSA_UID, "--recipient", ours.fingerprint, "--sign", "--encrypt",
                      data=payload).stdout
    result = decrypt_and_verify(message, [ours], [gpg_rsa])
    assert result.data == payload and result.filename == b""
    if size >= 8192:  # gpg streams stdin: encrypted and literal data come in partial body lengths
        listing = gpg.run("--list-packets", data=message).stdout.decode()
        assert "tag=18 hlen=2 plen=0 partial new-ctb" in listing


def test_we_verify_gpg_signing_subkey_with_back_signature(gpg, ours):
    uid = "Gpg Subkeys <gpg-sub@site-e.example>"
    gpg.run("--quick-gen-key", uid, "rsa3072", "cert", "never")
    primary = gpg.fingerprints(uid)[0]
    gpg.run("--quick-add-key", primary, "rsa3072", "sign", "never")
    gpg.run("--quick-add-key", primary, "rsa3072", "encr", "never")
    key = import_public_key(gpg.run("--armor", "--export", uid).stdout)
    assert [use.flags for use in key.uses] == [0x01, 0x02, 0x0C]
    message = gpg.run("--local-user", uid, "--recipient", ours.fingerprint, "--sign", "--encrypt",
                      data=b"signed by a subkey").stdout
    result = decrypt_and_verify(message, [ours], [key])
    assert result.signer_fingerprint == primary == key.fingerprint
    reply = encrypt_and_sign(b"to the encryption subkey", [key], ours)
    assert gpg.run("--decrypt", data=reply).stdout == b"to the encryption subkey"


@pytest.mark.parametrize("uid", [RSA_UID, ED_UID], ids=["rsa", "cv25519"])
def test_we_decrypt_for_gpg_generated_secret_keys(gpg, ours, uid):
    secret = import_secret_key(gpg.run("--armor", "--export-secret-keys", uid).stdout)
    payload = b"report " * 1000
    message = gpg.run("--local-user", ours.fingerprint, "--recipient", uid, "--sign", "--encrypt",
                      data=payload).stdout
    assert decrypt_and_verify(message, [secret], [ours]).data == payload


def test_tampered_gpg_message_and_unknown_gpg_signer(gpg, ours, gpg_rsa, gpg_ed):
    message = gpg.run("--local-user", RSA_UID, "--recipient", ours.fingerprint, "--compress-algo", "none",
                      "--sign", "--encrypt", data=os.urandom(5000)).stdout
    with pytest.raises(UnknownSender):
        decrypt_and_verify(message, [ours], [gpg_ed])
    tampered = bytearray(message)
    tampered[-100] ^= 0x20
    with pytest.raises(TamperedMessage):
        decrypt_and_verify(bytes(tampered), [ours], [gpg_rsa])


@pytest.mark.parametrize("operation, error", [
    (["--encrypt"], NotSigned),
    (["--sign"], NotEncrypted),
    (["--armor", "--sign"], NotEncrypted),
    (["--clearsign"], NotEncrypted),
    (["--armor", "--detach-sign"], NotEncrypted),
    (["--passphrase", "not-a-key", "--symmetric"], WrongRecipientKey),
])
def test_gpg_messages_we_refuse(gpg, ours, gpg_rsa, operation, error):
    message = gpg.run("--local-user", RSA_UID, "--recipient", ours.fingerprint, *operation,
                      data=b"DICOM data\n").stdout
    with pytest.raises(error):
        decrypt_and_verify(message, [ours], [gpg_rsa])


@pytest.mark.parametrize("signer_uid", [RSA_UID, ED_UID], ids=["rsa", "ed25519"])
@pytest.mark.parametrize("mode", [[], ["--textmode"], ["--armor"], ["--armor", "--textmode"]],
                         ids=["binary", "text", "armor", "armor-text"])
def test_we_verify_gpg_detached_signatures(gpg, gpg_rsa, gpg_ed, tmp_path, signer_uid, mode):
    entity = b"Content-Type: application/dicom\r\n\r\nDICM body\r\n"
    source = tmp_path / "entity.txt"
    source.write_bytes(entity)
    signature = gpg.run("--local-user", signer_uid, *mode, "--output", "-", "--detach-sign", str(source)).stdout
    verified = verify_detached(entity, signature, [gpg_rsa, gpg_ed])
    assert verified.signer_fingerprint == (gpg_rsa if signer_uid == RSA_UID else gpg_ed).fingerprint
    with pytest.raises(BadSignature):
        verify_detached(entity + b"x", signature, [gpg_rsa, gpg_ed])


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
def test_gpg_verifies_our_detached_signatures(gpg, ours, tmp_path, text):
    entity = b"Content-Type: message/disposition-notification\r\n\r\nDisposition: displayed\r\n"
    (tmp_path / "entity").write_bytes(entity)
    (tmp_path / "entity.asc").write_bytes(sign_detached(entity, ours, text=text))
    result = gpg.run("--verify", str(tmp_path / "entity.asc"), str(tmp_path / "entity"))
    assert gpg.status(result, "VALIDSIG")[0][0] == ours.fingerprint
    (tmp_path / "entity").write_bytes(entity + b"x")
    bad = gpg.run("--verify", str(tmp_path / "entity.asc"), str(tmp_path / "entity"), check=False)
    assert bad.returncode != 0 and gpg.status(bad, "BADSIG")


def test_gpg_reads_our_public_key_block(gpg, ours, tmp_path):
    other = Gpg(Path(tempfile.mkdtemp(prefix="gpg-")))
    try:
        other.home.chmod(0o700)
        other.run("--import", data=export_public_key(ours))
        assert other.fingerprints(ours.fingerprint)[0] == ours.fingerprint
        # gpg re-exports the same key material we made
        exported = other.run("--export", ours.fingerprint).stdout
        assert import_public_key(exported).fingerprint == ours.fingerprint
        assert dearmor(export_public_key(ours))[1] == import_public_key(exported).packets
    finally:
        subprocess.run(["gpgconf", "--homedir", str(other.home), "--kill", "all"], capture_output=True)
        shutil.rmtree(other.home, ignore_errors=True)


def test_gpg_expired_and_revoked_keys_are_refused(gpg, ours):
    expired_uid, revoked_uid = "Gpg Expired <expired@site-f.example>", "Gpg Revoked <revoked@site-g.example>"
    past = ["--faked-system-time", "20200101T000000!", "--ignore-time-conflict"]
    gpg.run(*past, "--quick-gen-key", expired_uid, "default", "default", "1d")
    old_message = gpg.run(*past, "--local-user", expired_uid, "--recipient", expired_uid, "--sign",
                          "--encrypt", data=b"signed while valid").stdout
    expired = import_public_key(gpg.run("--armor", "--export", expired_uid).stdout)
    expired_secret = import_secret_key(gpg.run("--armor", "--export-secret-keys", expired_uid).stdout)
    with pytest.raises(KeyExpired):
        encrypt_and_sign(b"x", [expired], ours)
    with pytest.raises(KeyExpired):  # decrypting still works; the signing key expired since
        decrypt_and_verify(old_message, [expired_secret], [expired])

    gpg.run("--quick-gen-key", revoked_uid, "default", "default", "never")
    fingerprint = gpg.fingerprints(revoked_uid)[0]
    message = gpg.run("--local-user", revoked_uid, "--recipient", ours.fingerprint, "--sign", "--encrypt",
                      data=b"before revocation").stdout
    certificate = (gpg.home / "openpgp-revocs.d" / f"{fingerprint}.rev").read_bytes()
    gpg.run("--import", data=certificate.replace(b":-----BEGIN", b"-----BEGIN"))  # gpg's guard against accidents
    revoked = import_public_key(gpg.run("--armor", "--export", revoked_uid).stdout)
    assert revoked.primary.revoked
    with pytest.raises(KeyRevoked):
        encrypt_and_sign(b"x", [revoked], ours)
    with pytest.raises(KeyRevoked):
        decrypt_and_verify(message, [ours], [revoked])


def test_we_sign_with_gpg_made_ed25519_secret_key(gpg, ours):
    secret = import_secret_key(gpg.run("--armor", "--export-secret-keys", ED_UID).stdout)
    result = gpg.run("--decrypt", data=encrypt_and_sign(b"ed25519 signed", [ours], secret))
    assert result.stdout == b"ed25519 signed"
    assert gpg.status(result, "VALIDSIG")[0][0] == secret.fingerprint


def test_classic_dsa_elgamal_keys_of_older_sites(gpg, ours):
    """gpg 1.4-era keys (DSA signing, Elgamal encryption subkey), still found on older DRG sites."""
    uid = "Old Site <old@site-h.example>"
    gpg.run("--quick-gen-key", uid, "dsa2048", "sign", "never")
    gpg.run("--quick-add-key", gpg.fingerprints(uid)[0], "elg2048", "encr", "never")
    key = import_public_key(gpg.run("--armor", "--export", uid).stdout)
    assert [use.part.algorithm for use in key.uses] == [PubKeyAlgo.DSA, PubKeyAlgo.ELGAMAL]
    message = gpg.run("--local-user", uid, "--recipient", ours.fingerprint, "--sign", "--encrypt",
                      data=b"DSA signed").stdout
    assert decrypt_and_verify(message, [ours], [key]).signer_fingerprint == key.fingerprint
    result = gpg.run("--decrypt", data=encrypt_and_sign(b"to Elgamal", [key], ours))
    assert result.stdout == b"to Elgamal" and gpg.status(result, "VALIDSIG")[0][0] == ours.fingerprint
    secret = import_secret_key(gpg.run("--armor", "--export-secret-keys", uid).stdout)
    message = gpg.run("--local-user", ours.fingerprint, "--recipient", uid, "--sign", "--encrypt",
                      data=b"for the Elgamal secret").stdout
    assert decrypt_and_verify(message, [secret], [ours]).data == b"for the Elgamal secret"
    result = gpg.run("--decrypt", data=encrypt_and_sign(b"DSA signed by us", [ours], secret))
    assert gpg.status(result, "VALIDSIG")[0][0] == key.fingerprint


@pytest.mark.parametrize("curve", ["nistp256", "nistp384", "nistp521", "brainpoolP256r1"])
def test_ecdsa_ecdh_keys_on_named_curves(gpg, ours, curve):
    uid = f"Ecc {curve} <{curve.lower()}@site-i.example>"
    gpg.run("--quick-gen-key", uid, curve, "sign", "never")
    gpg.run("--quick-add-key", gpg.fingerprints(uid)[0], curve, "encr", "never")
    key = import_public_key(gpg.run("--armor", "--export", uid).stdout)
    assert [use.part.algorithm for use in key.uses] == [PubKeyAlgo.ECDSA, PubKeyAlgo.ECDH]
    message = gpg.run("--local-user", uid, "--recipient", ours.fingerprint, "--sign", "--encrypt",
                      data=b"ECDSA signed").stdout
    assert decrypt_and_verify(message, [ours], [key]).signer_fingerprint == key.fingerprint
    result = gpg.run("--decrypt", data=encrypt_and_sign(b"to ECDH", [key], ours))
    assert result.stdout == b"to ECDH" and gpg.status(result, "VALIDSIG")[0][0] == ours.fingerprint
    secret = import_secret_key(gpg.run("--armor", "--export-secret-keys", uid).stdout)
    message = gpg.run("--local-user", ours.fingerprint, "--recipient", uid, "--sign", "--encrypt",
                      data=b"for the ECDH secret").stdout
    assert decrypt_and_verify(message, [secret], [ours]).data == b"for the ECDH secret"
    result = gpg.run("--decrypt", data=encrypt_and_sign(b"ECDSA signed by us", [ours], secret))
    assert gpg.status(result, "VALIDSIG")[0][0] == key.fingerprint


def test_passphrase_protected_and_subkey_only_secret_exports(gpg, ours):
    uid, passphrase = "Protected <protected@site-j.example>", "sesam öffne dich"
    protect = ["--passphrase", passphrase]
    gpg.run(*protect, "--quick-gen-key", uid, "default", "default", "never")
    exported = gpg.run(*protect, "--armor", "--export-secret-keys", uid).stdout
    with pytest.raises(InvalidKey):
        import_secret_key(exported)
    with pytest.raises(InvalidKey):
        import_secret_key(exported, passphrase=b"wrong")
    key = import_secret_key(exported, passphrase=passphrase.encode())
    assert import_secret_key(export_secret_key(key)).fingerprint == key.fingerprint   # stored unprotected
    message = gpg.run("--local-user", ours.fingerprint, "--recipient", uid, "--sign", "--encrypt",
                      data=b"for the protected key").stdout
    assert decrypt_and_verify(message, [key], [ours]).data == b"for the protected key"
    subkeys_only = import_secret_key(gpg.run(*protect, "--armor", "--export-secret-subkeys", uid).stdout,
                                     passphrase=passphrase.encode())
    assert len(subkeys_only.private) == 1                      # primary is a gnu-dummy stub (S2K 101)
    assert decrypt_and_verify(message, [subkeys_only], [ours]).data == b"for the protected key"
    with pytest.raises(KeyUnusable):
        sign_detached(b"x", subkeys_only)
