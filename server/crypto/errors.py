"""The OpenPGP failures the mail gateway tells apart (DESIGN.md section 5).

    OpenPGPError(ServerError)
      NotEncrypted          INVALID   the input is no encrypted OpenPGP message
      MalformedPacket       INVALID   broken armor, truncated or inconsistent packets
      UnsupportedAlgorithm  INVALID   an algorithm or packet version we do not implement
      InvalidKey            INVALID   a key block without a valid self-signature
      WrongRecipientKey     SECURITY  none of our secret keys opens the message
      TamperedMessage       SECURITY  MDC mismatch or missing integrity protection (RFC 4880 section 5.13)
      UnknownSender         SECURITY  signed by a key we do not know
        NotSigned           SECURITY  no signature at all
      BadSignature          SECURITY  the signature does not verify
      KeyUnusable           SECURITY  no usable key for the operation
        KeyExpired          SECURITY
        KeyRevoked          SECURITY
"""

from __future__ import annotations

from server.errors import ErrorKind, ServerError


class OpenPGPError(ServerError):
    """Base of every OpenPGP failure; ``kind`` is fixed per subclass."""

    kind_of: ErrorKind = ErrorKind.INVALID
    default_message = "OpenPGP failure"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(self.kind_of, message or self.default_message)


class NotEncrypted(OpenPGPError):
    """The input is not an encrypted OpenPGP message (RFC 4880 section 11.3)."""

    default_message = "not an encrypted OpenPGP message"


class MalformedPacket(OpenPGPError):
    """Broken armor or packets (RFC 4880 sections 4, 6)."""

    default_message = "malformed OpenPGP data"


class UnsupportedAlgorithm(OpenPGPError):
    """An algorithm, packet version or feature we do not implement (RFC 4880 section 9)."""

    default_message = "unsupported OpenPGP algorithm"


class InvalidKey(OpenPGPError):
    """A transferable key without valid self-signatures (RFC 4880 section 11.1)."""

    default_message = "invalid OpenPGP key"


class WrongRecipientKey(OpenPGPError):
    """No secret key of ours matches a public-key encrypted session key packet (RFC 4880 section 5.1)."""

    kind_of = ErrorKind.SECURITY
    default_message = "wrong recipient key"


class TamperedMessage(OpenPGPError):
    """Modification detected or integrity protection missing (RFC 4880 sections 5.13, 5.14)."""

    kind_of = ErrorKind.SECURITY
    default_message = "message was modified (MDC mismatch)"


class UnknownSender(OpenPGPError):
    """The message is signed, but by no key we know (RFC 4880 section 5.2.3.5)."""

    kind_of = ErrorKind.SECURITY
    default_message = "unknown sender"


class NotSigned(UnknownSender):
    """The message carries no signature (DESIGN.md section 4: unsigned mail is never imported)."""

    default_message = "unknown sender: message is not signed"


class BadSignature(OpenPGPError):
    """A signature by a known key that does not verify (RFC 4880 section 5.2.4)."""

    kind_of = ErrorKind.SECURITY
    default_message = "bad signature"


class KeyUnusable(OpenPGPError):
    """No key usable for the operation (key flags, RFC 4880 section 5.2.3.21)."""

    kind_of = ErrorKind.SECURITY
    default_message = "no usable key"


class KeyExpired(KeyUnusable):
    """The key or subkey is past its expiration time (RFC 4880 section 5.2.3.6)."""

    default_message = "key expired"


class KeyRevoked(KeyUnusable):
    """The key or subkey carries a valid revocation signature (RFC 4880 section 5.2.1)."""

    default_message = "key revoked"
