"""OpenPGP core (RFC 4880 v4 packets) interoperable with GnuPG 2.2: keys, signed+encrypted messages, detached
signatures. Pure: no I/O, no subprocess.

    keys.generate_key / import_* / export_*        transferable keys (RFC 4880 section 11)
    openpgp.encrypt_and_sign / decrypt_and_verify  messages (RFC 4880 section 11.3)
    openpgp.sign_detached / verify_detached        detached signatures (RFC 3156 section 5)
    errors                                         one exception per failure the gateway tells apart

We make RSA keys and AES-256 SEIPD (MDC) messages signed with SHA-256. We read and use keys made by gpg:
RSA, DSA + Elgamal, Ed25519 + Cv25519, ECDSA + ECDH on NIST P-256/384/521 and Brainpool curves; messages with
AES-128/192/256, ZIP/ZLIB/BZip2/none, partial body lengths, old and new packet headers.
Not supported: v3/v5/v6 keys and signatures, AEAD packets, symmetric-only (SKESK) messages, unprotected SED
packets (refused), cleartext signatures, ciphers other than AES, legacy (usage 1..253) key protection.
"""

from server.crypto.errors import (BadSignature, InvalidKey, KeyExpired, KeyRevoked, KeyUnusable, MalformedPacket,
                                  NotEncrypted, NotSigned, OpenPGPError, TamperedMessage, UnknownSender,
                                  UnsupportedAlgorithm, WrongRecipientKey)
from server.crypto.keys import (PublicKey, SecretKey, encryption_key, export_public_key, export_secret_key,
                                generate_key, import_public_key, import_public_keys, import_secret_key)
from server.crypto.openpgp import (MICALG, Decrypted, Verified, decrypt_and_verify, encrypt_and_sign, sign_detached,
                                   verify_detached)

__all__ = [
    "MICALG", "BadSignature", "Decrypted", "InvalidKey", "KeyExpired", "KeyRevoked", "KeyUnusable", "MalformedPacket",
    "NotEncrypted", "NotSigned", "OpenPGPError", "PublicKey", "SecretKey", "TamperedMessage", "UnknownSender",
    "UnsupportedAlgorithm", "Verified", "WrongRecipientKey", "decrypt_and_verify", "encrypt_and_sign",
    "encryption_key", "export_public_key", "export_secret_key", "generate_key", "import_public_key",
    "import_public_keys", "import_secret_key", "sign_detached", "verify_detached",
]
