"""Settings: one immutable object built once (environment ``TELERAD_*``, CLI flags override) and passed in."""

from __future__ import annotations

import enum
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DuplicatePolicy(str, enum.Enum):
    """What STOW-RS does with a SOP Instance UID already stored with different bytes."""

    REJECT = "reject"
    REPLACE = "replace"


class Settings(BaseSettings):
    """All settings of the server; frozen after construction."""

    model_config = SettingsConfigDict(env_prefix="TELERAD_", frozen=True, extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="Folder for the SQLite index, blobs and keys")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///DATA_DIR/index.sqlite3"
    )
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = Field(default=1, ge=1, le=64, description="worker processes of `telerad serve`")
    public_base_url: str | None = Field(
        default=None, description="Base URL used in RetrieveURL/BulkDataURI; default from the request"
    )
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.REJECT
    fhir_audit: bool = Field(default=True, description="write an AuditEvent with every FHIR create/update/delete")
    max_stow_bytes: int = Field(default=64 * 1024**3, description="Largest accepted STOW-RS request body")
    max_fhir_bytes: int = Field(default=64 * 1024**2, gt=0, description="Largest accepted FHIR request body")
    max_part_bytes: int = Field(default=16 * 1024**3, description="Largest accepted DICOM part")
    qido_max_limit: int = Field(default=1000, description="Largest QIDO page; bigger limits are cut")
    qido_default_limit: int = 1000
    token_ttl_seconds: int = 3600 * 24 * 365
    fsync: bool = Field(default=True, description="fsync blobs before the index commits (never off in production)")
    log_level: str = "info"
    # FHIR R4 Subscription (rest-hook) delivery: server/fhir/delivery.py
    subscription_worker: bool = Field(default=True, description="run the Subscription delivery worker in this process")
    subscription_poll_seconds: float = Field(default=1.0, gt=0, description="longest wait between queue polls")
    subscription_retry_base_seconds: float = Field(default=5.0, gt=0, description="first retry delay (doubles)")
    subscription_retry_max_seconds: float = Field(default=900.0, gt=0, description="longest retry delay")
    subscription_max_attempts: int = Field(default=10, ge=1, description="tries before a delivery is dead")
    subscription_timeout_seconds: float = Field(default=10.0, gt=0, description="HTTP timeout of one notification")
    subscription_lease_seconds: float = Field(default=60.0, gt=0, description="lease of a delivery being sent")
    subscription_batch: int = Field(default=32, ge=1, description="deliveries leased and sent at once")
    subscription_keep_seconds: float = Field(default=7 * 86400, gt=0,
                                             description="how long delivered notifications are kept")
    # DICOM e-mail gateway (DRG @GIT): server/gateway/
    gateway_worker: bool = Field(default=True, description="run SMTP ingress, mailbox polls and the sender here")
    smtp_host: str = Field(default="127.0.0.1", description="bind address of the SMTP ingress")
    smtp_port: int | None = Field(default=None, ge=0, le=65535,
                                  description="SMTP ingress port; None = off (`telerad serve` defaults to 2525)")
    smtp_hostname: str = Field(default="localhost", description="our name in the SMTP greeting and in EHLO")
    smtp_max_bytes: int = Field(default=256 * 1024**2, gt=0, description="largest accepted mail (552 above)")
    smtp_tls_cert: Path | None = Field(default=None, description="PEM certificate chain: STARTTLS is offered")
    smtp_tls_key: Path | None = Field(default=None, description="PEM key of smtp_tls_cert")
    smtp_require_tls: bool = Field(default=False, description="refuse mail before STARTTLS (530)")
    relay_host: str | None = Field(default=None, description="smarthost for every domain without a route")
    relay_port: int = Field(default=25, ge=1, le=65535)
    relay_tls: str = Field(default="starttls", description="none | starttls | implicit")
    relay_username: str | None = None
    relay_password: str | None = Field(default=None, repr=False)
    relay_ca_file: Path | None = Field(default=None, description="trust anchors of relays; default system store")
    relay_verify_tls: bool = Field(default=True, description="verify relay certificates (never off in production)")
    relay_timeout_seconds: float = Field(default=60.0, gt=0)
    mail_routes: str | None = Field(
        default=None, description="per-domain routes like a transport map: 'b.example=127.0.0.1:2526/none,...'")
    mailboxes_file: Path | None = Field(default=None, description="JSON list of polled POP3/IMAP mailboxes")
    mail_subject: str = Field(default="DICOM-eMail", description="subject of instance mails (DRG default)")
    default_max_mail_size: int = Field(default=20 * 1024**2, gt=1024,
                                       description="mail size limit of recipients whose Endpoint names none")
    send_batch: int = Field(default=32, ge=1, description="mails leased per round of the sender")
    send_concurrency: int = Field(default=8, ge=1,
                                  description="mails built and sent at once (each holds ~4x its mail in memory)")
    send_lease_seconds: float = Field(default=600.0, gt=0, description="lease of a mail being sent")
    send_retry_base_seconds: float = Field(default=30.0, gt=0, description="first retry delay (doubles)")
    send_retry_max_seconds: float = Field(default=3600.0, gt=0, description="longest retry delay")
    send_max_attempts: int = Field(default=10, ge=1, description="tries before a mail fails finally")
    receipt_timeout_seconds: float = Field(default=6 * 3600.0, gt=0, description="wait for an MDN before resending")
    incomplete_set_seconds: float = Field(default=24 * 3600.0, gt=0,
                                          description="an inbound set incomplete this long is reported")
    gateway_poll_seconds: float = Field(default=1.0, gt=0, description="longest idle wait of the gateway workers")
    deid_defaults: str = Field(
        default="", description="send-option codes (comma-separated, e.g. 'clean-descriptors,exclude-burned-in') "
        "applied to every anonymised teleconsult order besides its own (PS3.15 E.3 options)")

    @field_validator("deid_defaults")
    @classmethod
    def _deid_defaults(cls, value: str) -> str:
        """Known codes only, not both E.3.6 variants (``server.dicom.deidentify.send_option_codes``)."""
        from server.dicom.deidentify import send_option_codes  # pydicom only when the setting is given
        from server.errors import ServerError

        try:
            return ",".join(sorted(send_option_codes(value)))
        except ServerError as exc:
            raise ValueError(exc.message) from exc

    prior_auto_partners: str = Field(
        default="", description="requests for prior images (issue 5) answered without a person's approval from these "
        "sites: DICOM e-mail addresses, comma-separated, or '*' for every site of the directory; others wait for "
        "approval on their Task")

    def prior_auto(self, address: str) -> bool:
        """Whether a priors request from ``address`` is answered automatically (``prior_auto_partners``)."""
        partners = {p.strip().lower() for p in self.prior_auto_partners.split(",") if p.strip()}
        return "*" in partners or address.strip().lower() in partners

    @property
    def deid_default_codes(self) -> frozenset[str]:
        """The site's default de-identification codes (``deid_defaults``) as a set."""
        return frozenset(c for c in self.deid_defaults.split(",") if c)

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite inside the data folder."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite3').resolve()}"


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment, then apply explicit (CLI) overrides that are not None."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
