"""Typed configuration: ``config.yaml`` plus ``QGATE_*`` environment overrides.

Precedence, highest first: explicit arguments, environment (``QGATE_DICOM__PORT=11113``),
the YAML file (``--config PATH`` or ``QGATE_CONFIG``), then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

_AE_MAX = 16


def _check_ae(value: str) -> str:
    value = value.strip()
    if not value or len(value) > _AE_MAX or "\\" in value:
        raise ValueError(f"AE title must be 1-16 characters without backslash, got {value!r}")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae)]


class DicomConfig(BaseModel):
    ae_title: AETitle = "QGATE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    # Empty list accepts any calling AE title.
    allowed_calling_aets: list[str] = Field(default_factory=list)
    # Seconds an idle association may stay open before pynetdicom aborts it.
    network_timeout: float = 60.0
    # Sanity limits: anything larger is rejected with 0xA900 before it reaches the disk.
    max_rows: int = 4096
    max_columns: int = 4096
    max_frames: int = 4096


class ArchiveConfig(BaseModel):
    ae_title: AETitle = "ARCHIVE"
    host: str = "127.0.0.1"
    port: int = Field(4242, ge=1, le=65535)
    # The AE title qgate uses when it calls the archive.
    calling_ae_title: AETitle = "QGATE"
    timeout: float = 30.0


class SeriesConfig(BaseModel):
    # A series is complete after this many seconds with no new instance.
    stable_seconds: float = Field(60.0, ge=0)
    # Once every association that sent to a series has been released, wait only this long.
    release_grace_seconds: float = Field(5.0, ge=0)
    # How often the assembler looks for complete series.
    poll_seconds: float = Field(1.0, gt=0)


class DatabaseConfig(BaseModel):
    url: str = "sqlite:///var/qgate.db"
    echo: bool = False


class StorageConfig(BaseModel):
    root: Path = Path("./var")
    # fsync the instance file and its folder before answering Success (power-loss safety).
    fsync: bool = True


class QueueConfig(BaseModel):
    lease_seconds: float = Field(120.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    workers: int = Field(1, ge=1)
    poll_seconds: float = Field(0.5, gt=0)


class DispatchConfig(BaseModel):
    max_attempts: int = Field(8, ge=1)
    backoff_initial_seconds: float = Field(5.0, gt=0)
    backoff_max_seconds: float = Field(600.0, gt=0)
    poll_seconds: float = Field(1.0, gt=0)


class Threshold(BaseModel):
    """Flag when ``scores[scorer][output]`` is below ``min`` or above ``max``."""

    scorer: str
    output: str
    min: float | None = None
    max: float | None = None
    reason: str | None = None


#: Default limits for the classical measures (copied into ``config.yaml``).
#:
#: ``noise.noise_sigma_hu`` max 30 HU. Soft-tissue noise of routine diagnostic body CT
#: with soft-tissue kernels is typically 10-20 HU at 2.5-5 mm and somewhat higher for
#: thin slices; head protocols are lower still. Automated "global noise" measures of the
#: same kind (Christianson et al., AJR 2015) are what CT quality programmes track. At 30
#: HU the noise is about twice the usual level and comparable to the contrast of
#: low-contrast lesions (10-20 HU), so the series deserves a look: flagging, not
#: rejecting. This suits soft-tissue kernels only: sharp (lung, bone) kernels exceed 30
#: HU by design and need their own limit or exemption. Our judgement, not a standard.
#:
#: ``snr.snr`` min 25. SNR is (mean HU + 1000) / ROI std in soft tissue, so for muscle
#: (~40 HU) 25 corresponds to an ROI std of about 42 HU. The ROI std includes some
#: anatomy, so SNR reads lower than 1040 / sigma; the limit is set below the noise
#: limit's equivalent (1040 / 30 ~ 35) so that it catches grossly noisy series
#: without flagging everything the noise limit passes.
DEFAULT_THRESHOLDS: tuple[Threshold, ...] = (
    Threshold(
        scorer="noise",
        output="noise_sigma_hu",
        max=30.0,
        reason="soft-tissue noise too high for routine diagnostic CT",
    ),
    Threshold(
        scorer="snr",
        output="snr",
        min=25.0,
        reason="soft-tissue SNR too low",
    ),
)


def _default_thresholds() -> list[Threshold]:
    return list(DEFAULT_THRESHOLDS)


class GateConfig(BaseModel):
    mode: Literal["observe", "forward", "gate"] = "observe"
    thresholds: list[Threshold] = Field(default_factory=_default_thresholds)


class ScoringConfig(BaseModel):
    scorers: list[str] = Field(default_factory=lambda: ["noise", "snr"])
    device: Literal["auto", "cpu", "cuda"] = "auto"


class WebConfig(BaseModel):
    """The review web app, served by ``qgate serve`` beside the DICOM stages (``qgate.web``)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0 = any free port (tests)
    # Signs the session cookies. Unset: a random key is generated on first start and kept
    # in storage.root/web-secret.key (mode 0600). Nodes behind one address must share it
    # (QGATE_WEB__SECRET_KEY). Changing it logs everybody out.
    secret_key: SecretStr | None = None
    # Mark cookies Secure (sent over HTTPS only). Turn on when served over TLS, directly or
    # behind a TLS-terminating proxy.
    secure_cookies: bool = False
    # A login lasts this long.
    session_hours: float = Field(12.0, gt=0)
    # Worklist rows per page.
    page_size: int = Field(25, ge=5, le=200)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="QGATE_", env_nested_delimiter="__", extra="forbid"
    )

    node_name: str = Field(default_factory=lambda: os.uname().nodename)
    log_level: str = "INFO"
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig)
    series: SeriesConfig = Field(default_factory=SeriesConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    web: WebConfig = Field(default_factory=WebConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _CONFIG_PATH.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    @property
    def spool_dir(self) -> Path:
        return self.storage.root / "spool"

    @property
    def outgoing_dir(self) -> Path:
        return self.storage.root / "outgoing"


# pydantic-settings builds sources from the class, so the chosen file is handed over here
# for the duration of one load_settings() call only.
_CONFIG_PATH: dict[str, Path | None] = {}


def default_config_path() -> Path | None:
    """``QGATE_CONFIG`` if set, else ``./config.yaml`` if it exists."""
    env = os.environ.get("QGATE_CONFIG")
    if env:
        return Path(env)
    local = Path("config.yaml")
    return local if local.exists() else None


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (or the default file), the environment and overrides."""
    chosen = Path(path) if path is not None else default_config_path()
    if chosen is not None and not chosen.is_file():
        raise FileNotFoundError(f"config file not found: {chosen}")
    _CONFIG_PATH["path"] = chosen
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_PATH.pop("path", None)
