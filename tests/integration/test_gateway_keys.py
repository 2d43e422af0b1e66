"""`telerad keys init/export/import` as real processes, checked against the real GnuPG 2.2 (RFC 4880 11.1, 11.2).

gpg runs on a throwaway ``--homedir`` (never ~/.gnupg); its agent is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from server.crypto import decrypt_and_verify, encrypt_and_sign, generate_key, import_public_key
from server.errors import ServerError
from server.gateway.keys import PUBLIC_FILE, SECRET_FILE, import_key, load_key

GPG = "/usr/bin/gpg"
ROOT = Path(__file__).resolve().parents[2]
GPG_UID = "Klinikum Alt <dicom@alt.example>"
PASSPHRASE = "correct horse battery staple"


def telerad(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELERAD_")}
    result = subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


class Gpg:
    """The gpg command line on a private home directory."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def run(self, *args: str, data: bytes | None = None, passphrase: str = "") -> subprocess.CompletedProcess:
        cmd = [GPG, "--homedir", str(self.home), "--batch", "--yes", "--pinentry-mode", "loopback",
               "--passphrase", passphrase, "--trust-model", "always", *args]
        result = subprocess.run(cmd, input=data, capture_output=True, timeout=120)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        return result

    def fingerprints(self, who: str) -> list[str]:
        out = self.run("--with-colons", "--list-keys", who).stdout.decode()
        return [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")]


@pytest.fixture(scope="module")
def gpg():
    if not os.path.exists(GPG):
        pytest.skip("GnuPG (/usr/bin/gpg) is not installed")
    home = Path(tempfile.mkdtemp(prefix="gpg-"))  # short path: the agent socket lives here
    home.chmod(0o700)
    tool = Gpg(home)
    tool.run("--quick-gen-key", GPG_UID, "default", "default", "never", passphrase=PASSPHRASE)  # rsa3072 + subkey
    yield tool
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A data folder with the key of tenant site-a made by `telerad keys init`, and its printed fingerprint."""
    data = tmp_path_factory.mktemp("keys") / "data"
    out = telerad("keys", "init", "--data-dir", str(data), "--tenant", "site-a", "--address",
                  "dicom@site-a.example", "--name", "Klinikum Bremen-Mitte").stdout.strip()
    return data, out


def test_init_prints_the_fingerprint_and_stores_private_files(site):
    data, fingerprint = site
    assert len(fingerprint) == 40 and all(c in "0123456789ABCDEF" for c in fingerprint)
    folder = data / "keys" / "site-a"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / SECRET_FILE).stat().st_mode) == 0o600
    assert load_key(data, "site-a").fingerprint == fingerprint
    assert import_public_key((folder / PUBLIC_FILE).read_bytes()).fingerprint == fingerprint
    assert not list(folder.glob(".*.tmp"))


def test_exported_key_imports_into_gpg_with_the_same_fingerprint(site, gpg):
    data, fingerprint = site
    armored = telerad("keys", "export", "--data-dir", str(data), "--tenant", "site-a").stdout
    assert armored.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert "PRIVATE" not in armored
    gpg.run("--import", data=armored.encode())
    assert gpg.fingerprints("dicom@site-a.example")[0] == fingerprint
    uids = gpg.run("--with-colons", "--list-keys", fingerprint).stdout.decode()
    assert "Klinikum Bremen-Mitte <dicom@site-a.example>" in uids
    # gpg encrypts to the site's key; the site decrypts with the stored secret key
    gpg.run("--import", data=(data / "keys" / "site-a" / SECRET_FILE).read_bytes())
    sealed = gpg.run("--armor", "--encrypt", "--sign", "--local-user", fingerprint, "--recipient", fingerprint,
                     data=b"DICOM payload").stdout
    key = load_key(data, "site-a")
    assert decrypt_and_verify(sealed, [key], [key]).data == b"DICOM payload"


def test_init_refuses_to_overwrite_unless_forced(site, tmp_path):
    data, fingerprint = site
    again = telerad("keys", "init", "--data-dir", str(data), "--tenant", "site-a", "--address", "x@site-a.example",
                    check=False)
    assert again.returncode == 2 and "already has a key" in again.stderr and "--force" in again.stderr
    assert load_key(data, "site-a").fingerprint == fingerprint
    other = tmp_path / "data"
    first = telerad("keys", "init", "--data-dir", str(other), "--tenant", "t", "--address", "a@t.example").stdout
    second = telerad("keys", "init", "--data-dir", str(other), "--tenant", "t", "--address", "a@t.example",
                     "--force").stdout
    assert first != second and load_key(other, "t").fingerprint == second.strip()


def test_load_refuses_open_permissions_and_missing_keys(tmp_path):
    data = tmp_path / "data"
    with pytest.raises(ServerError, match="has no key"):
        load_key(data, "site-a")
    import_key(data, "site-a", _small_key_secret())
    secret = data / "keys" / "site-a" / SECRET_FILE
    secret.chmod(0o640)
    with pytest.raises(ServerError, match="too open"):
        load_key(data, "site-a")
    result = telerad("keys", "export", "--data-dir", str(data), "--tenant", "site-a", check=False)
    assert result.returncode == 2 and "too open" in result.stderr
    secret.chmod(0o600)
    (data / "keys" / "site-a").chmod(0o755)
    with pytest.raises(ServerError, match="too open"):
        load_key(data, "site-a")
    bad = telerad("keys", "init", "--data-dir", str(data), "--tenant", "../etc", "--address", "a@b.example",
                  check=False)
    assert bad.returncode == 2 and "invalid tenant" in bad.stderr


def _small_key_secret() -> bytes:
    from server.crypto import export_secret_key

    return export_secret_key(generate_key("Small <small@site.example>", bits=2048))


def test_gpg_secret_key_imports_with_the_same_fingerprint(gpg, tmp_path):
    fingerprint = gpg.fingerprints(GPG_UID)[0]
    exported = tmp_path / "secret.asc"
    exported.write_bytes(gpg.run("--armor", "--export-secret-keys", fingerprint, passphrase=PASSPHRASE).stdout)
    data = tmp_path / "data"
    no_pass = telerad("keys", "import", "--data-dir", str(data), "--tenant", "alt", str(exported), check=False)
    assert no_pass.returncode == 2 and "passphrase" in no_pass.stderr.lower()
    assert not (data / "keys" / "alt" / SECRET_FILE).exists()
    pass_file = tmp_path / "pass"
    pass_file.write_text(PASSPHRASE + "\n")
    out = telerad("keys", "import", "--data-dir", str(data), "--tenant", "alt", str(exported),
                  "--passphrase-file", str(pass_file)).stdout.strip()
    assert out == fingerprint
    assert stat.S_IMODE((data / "keys" / "alt" / SECRET_FILE).stat().st_mode) == 0o600
    # the imported key signs what gpg verifies and decrypts what gpg encrypts
    key = load_key(data, "alt")
    other = generate_key("Peer <peer@site.example>", bits=2048)
    assert decrypt_and_verify(encrypt_and_sign(b"x", [key], other), [key], [other]).data == b"x"
    sealed = gpg.run("--armor", "--encrypt", "--sign", "--local-user", fingerprint, "--recipient", fingerprint,
                     data=b"to alt", passphrase=PASSPHRASE).stdout
    assert decrypt_and_verify(sealed, [key], [key]).data == b"to alt"
    again = telerad("keys", "import", "--data-dir", str(data), "--tenant", "alt", str(exported),
                    "--passphrase-file", str(pass_file), check=False)
    assert again.returncode == 2 and "already has a key" in again.stderr


def test_subkey_only_export_is_refused(gpg, tmp_path):
    fingerprint = gpg.fingerprints(GPG_UID)[0]
    stub = tmp_path / "stub.asc"
    stub.write_bytes(gpg.run("--armor", "--export-secret-subkeys", fingerprint, passphrase=PASSPHRASE).stdout)
    pass_file = tmp_path / "pass"
    pass_file.write_text(PASSPHRASE)
    result = telerad("keys", "import", "--data-dir", str(tmp_path / "data"), "--tenant", "alt", str(stub),
                     "--passphrase-file", str(pass_file), check=False)
    assert result.returncode == 2 and "cannot be used" in result.stderr, result.stderr
