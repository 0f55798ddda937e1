"""One typed settings object for the whole node.

Sources, highest priority first: explicit overrides (CLI flags), ``RADFINDER_*`` environment
variables, the TOML file (``--config``, ``$RADFINDER_CONFIG`` or ``./radfinder.toml``), defaults.
Keeping every knob in one validated object means a typo in a site's config fails at start-up
instead of silently falling back to a default in some corner of the code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = Path("radfinder.toml")


def _default_selection() -> dict[str, Any]:
    from dicom_io.selection import DEFAULT_SELECTION

    return dict(DEFAULT_SELECTION)


def _default_bundle() -> Path:
    """The demo bundle shipped inside the ``engines`` package (found without importing torch)."""
    import importlib.util

    spec = importlib.util.find_spec("engines")
    roots = list(spec.submodule_search_locations or []) if spec else []
    base = Path(roots[0]) if roots else Path("engines")
    return base / "bundles" / "demo-tiny"


class Settings(BaseSettings):
    """Effective configuration of one node process."""

    model_config = SettingsConfigDict(
        env_prefix="RADFINDER_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Field(Path("data"), description="spool, quarantine and the SQLite file")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/radfinder.db"
    )
    ae_title: str = Field("RADFINDER", description="our AE title (max 16 chars)")
    host: str = Field("0.0.0.0", description="address the DICOM listener binds")
    port: int = Field(11112, ge=0, le=65535, description="DICOM listener port")
    allowed_calling_aes: list[str] = Field(
        default_factory=list,
        description="who may associate: AE, AE@ADDRESS, AE@NETWORK/PREFIX, AE@HOSTNAME or "
        "*@NETWORK/PREFIX; empty = any AE from anywhere",
    )
    # --- security on the hospital network (issue 7) -------------------------------------------
    max_associations_per_peer: int = Field(
        16, ge=0, description="open DICOM associations one peer address may hold; 0 = unlimited"
    )
    max_instance_bytes: int = Field(
        4 * 1024**3, ge=0, description="largest instance accepted (C-STORE); 0 = unlimited"
    )
    dicom_tls: bool = Field(False, description="the DICOM listener speaks TLS only")
    hl7_tls: bool = Field(False, description="the HL7 (MLLP) listener speaks TLS only")
    tls_cert: Path | None = Field(
        None, description="PEM certificate (chain) of the listeners, also offered to peers"
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_ca: Path | None = Field(
        None, description="PEM CA bundle: verifies client certificates and TLS destinations"
    )
    tls_require_client_cert: bool = Field(
        False, description="TLS clients must present a certificate signed by tls_ca"
    )
    quiet_period_s: float = Field(
        5.0, ge=0, description="a series is complete this long after its last instance"
    )
    completion_poll_s: float = Field(0.5, gt=0, description="how often completion is checked")
    fsync: bool = Field(
        True, description="fsync each instance (and the SQLite WAL) before answering success"
    )
    max_pdu: int = Field(0, ge=0, description="maximum PDU we accept; 0 = unlimited")
    log_level: str = Field("INFO")
    log_json: bool = Field(True, description="one JSON object per log line")
    selection: dict[str, Any] = Field(
        default_factory=_default_selection, description="series selection rules (TOML shape)"
    )

    # --- inference: queue, jobs, engine (issue 5) ----------------------------------------------
    broker_url: str | None = Field(
        None,
        description="Celery broker (redis://, amqp://, sqla+<SQLAlchemy URL>); "
        "default sqla+sqlite:///<data_dir>/broker.sqlite, durable and embedded",
    )
    result_backend: str | None = Field(
        None, description="Celery result backend; none: job results live in the jobs table"
    )
    queue: str = Field("inference", min_length=1, description="Celery queue of inference jobs")
    broker_poll_s: float = Field(
        0.25, gt=0, description="poll interval of the embedded (SQLite) broker"
    )
    embedded_worker: bool = Field(True, description="run an inference worker inside serve")
    bundle_path: Path = Field(default_factory=_default_bundle, description="model bundle")
    engine_runtime: str = Field(
        "auto", description="auto (TensorRT > ONNX Runtime > torch by availability), onnx, ..."
    )
    engine_device: str = Field("auto", description="auto (a GPU if any), cpu, cuda or cuda:N")
    job_timeout_s: float = Field(
        1800.0, gt=0, description="longest a job may run; a running job older is stale"
    )
    job_queued_stale_s: float = Field(
        900.0, gt=0, description="a job queued this long without a worker starting it is re-sent"
    )
    job_max_attempts: int = Field(3, ge=1, description="attempts before a job is failed")
    reconcile_interval_s: float = Field(30.0, gt=0, description="reconciler period")
    # --- outbox ---------------------------------------------------------------------------
    destinations: list[str] = Field(
        default_factory=list, description="where results are sent, each AE@HOST:PORT"
    )
    send_timeout_s: float = Field(
        30.0, gt=0, description="C-STORE connect, association and stalled-socket timeout"
    )
    send_dimse_timeout_s: float = Field(
        120.0,
        gt=0,
        description="wait for each C-STORE response once the object is sent; past it the send "
        "is ambiguous (the peer may have stored it) and is retried",
    )
    send_max_attempts: int = Field(8, ge=1, description="sends tried before an object fails")
    send_backoff_s: float = Field(5.0, gt=0, description="first retry delay; doubles each try")
    send_backoff_max_s: float = Field(600.0, gt=0, description="longest retry delay")
    outbox_poll_s: float = Field(0.5, gt=0, description="how often the outbox is checked")
    # --- HL7 reports (issue 6) ------------------------------------------------------------
    hl7_enabled: bool = Field(True, description="open the HL7 (MLLP) listener in serve")
    hl7_host: str | None = Field(None, description="address the HL7 listener binds; default host")
    hl7_port: int = Field(2575, ge=0, le=65535, description="HL7 MLLP port; 0 = any free port")
    hl7_accession_field: Literal["OBR-18", "OBR-3"] = Field(
        "OBR-18", description="where reports carry the accession number linked to studies"
    )
    hl7_max_message_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="largest HL7 message accepted (PDF reports inside)"
    )
    hl7_idle_timeout_s: float = Field(
        0, ge=0, description="close an HL7 connection silent this long; 0 = keep it open"
    )
    # --- retraining export (issue 6) ----------------------------------------------------------
    export_dir: Path | None = Field(
        None, description="where the nightly export writes; default <data_dir>/export"
    )
    export_time: str = Field(
        "02:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="nightly export, HH:MM UTC"
    )
    export_nightly: bool = Field(True, description="schedule the nightly export (Celery beat)")
    deid: bool = Field(
        True, description="de-identify exports: pseudonyms, per-patient date shift, clean text"
    )
    deid_secret: SecretStr | None = Field(
        None, description="HMAC key of the pseudonyms; default: created in <data_dir>/deid_secret"
    )
    # --- retention (issue 7): what the node deletes, and when ----------------------------------
    retention_spool_days: float = Field(
        14.0,
        ge=0,
        description="delete a study's received instances this many days after its last one, "
        "once every series is decided and its jobs are done and sent; 0 = keep forever",
    )
    retention_results_days: float = Field(
        30.0,
        ge=0,
        description="delete a written SR/KOS this many days after every destination confirmed "
        "it (results never sent anywhere are kept); 0 = keep forever",
    )
    retention_quarantine_days: float = Field(
        90.0, ge=0, description="delete quarantined input this many days old; 0 = keep forever"
    )
    retention_interval_s: float = Field(
        3600.0, gt=0, description="how often the node runs the cleanup"
    )
    # --- HTTP: health, readiness, metrics, status page (issue 7) -----------------------------
    http_enabled: bool = Field(True, description="serve /healthz, /readyz, /metrics and /")
    http_host: str = Field(
        "127.0.0.1", description="address the HTTP server binds; loopback unless opened on purpose"
    )
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP port; 0 = any free port")
    http_password: SecretStr | None = Field(
        None, description="HTTP Basic password (any user name) on every path but /healthz"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae_title_valid(cls, v: str) -> str:
        v = v.strip()
        if not 0 < len(v) <= 16 or "\\" in v or not v.isprintable():
            raise ValueError("AE title must be 1-16 printable characters without backslash")
        return v

    @field_validator("selection")
    @classmethod
    def _selection_valid(cls, v: dict[str, Any]) -> dict[str, Any]:
        from dicom_io.selection import rules_from_config

        rules_from_config(v)  # raises ValueError with the reason
        return v

    @field_validator("destinations")
    @classmethod
    def _destinations_valid(cls, v: list[str]) -> list[str]:
        if not v:
            return v
        from dicom_io.scu import Destination

        for text in v:
            Destination.parse(text)  # raises ValueError with the reason
        return v

    @field_validator("allowed_calling_aes")
    @classmethod
    def _allowed_calling_aes_valid(cls, v: list[str]) -> list[str]:
        from radfinder_node.security import AllowEntry

        for text in v:
            AllowEntry.parse(text)  # raises ValueError naming the entry
        return v

    @model_validator(mode="after")
    def _tls_complete(self) -> Settings:
        """TLS settings that cannot work fail here, not at the first handshake."""
        if (self.dicom_tls or self.hl7_tls) and self.tls_cert is None:
            raise ValueError("dicom_tls/hl7_tls need tls_cert (and tls_key unless it is inside)")
        if self.tls_require_client_cert and self.tls_ca is None:
            raise ValueError("tls_require_client_cert needs tls_ca to verify client certificates")
        return self

    @property
    def effective_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def visibility_timeout_s(self) -> float:
        """Redis/SQS redeliver an unacked message after this; it must outlast the longest job."""
        return 2 * self.job_timeout_s

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'radfinder.db').resolve()}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def effective_hl7_host(self) -> str:
        return self.hl7_host if self.hl7_host is not None else self.host

    @property
    def effective_export_dir(self) -> Path:
        return self.export_dir if self.export_dir is not None else self.data_dir / "export"

    @property
    def export_hour_minute(self) -> tuple[int, int]:
        hour, minute = self.export_time.split(":")
        return int(hour), int(minute)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def config_path(explicit: Path | None = None) -> Path | None:
    """The TOML file to read: explicit, then ``$RADFINDER_CONFIG``, then ``./radfinder.toml``."""
    if explicit is not None:
        if not explicit.is_file():
            raise FileNotFoundError(f"config file not found: {explicit}")
        return explicit
    env = os.environ.get("RADFINDER_CONFIG")
    if env:
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"RADFINDER_CONFIG points to a missing file: {path}")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings; ``overrides`` with value None are ignored (unset CLI flags)."""
    path = config_path(config_file)
    given = {k: v for k, v in overrides.items() if v is not None}

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})

    return _FileSettings(**given)
