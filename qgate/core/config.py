"""Typed configuration: ``config.yaml`` plus ``QGATE_*`` environment overrides.

Precedence, highest first: explicit arguments, environment (``QGATE_DICOM__PORT=11113``),
the YAML file (``--config PATH`` or ``QGATE_CONFIG``), then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from qgate.core.families import FAMILIES, FAMILY_NAMES, family

_AE_MAX = 16

#: Names qgate's data folder: the default ``storage.root`` and the folder of the default
#: SQLite database. The systemd unit and the container images set it (/var/lib/qgate).
HOME_ENV = "QGATE_HOME"
#: Without QGATE_HOME: ``var`` under the working directory, the embedded default of a
#: checkout (`qgate serve` in the repository keeps everything in ./var).
DEFAULT_HOME = Path("var")


def default_home() -> Path:
    """``$QGATE_HOME`` if set (it must be absolute), else ``./var``.

    Only defaults follow it: ``storage.root`` and ``database.url`` set in the config file
    or the environment win.
    """
    env = os.environ.get(HOME_ENV)
    if not env:
        return DEFAULT_HOME
    home = Path(env)
    if not home.is_absolute():
        # A relative home would move with the working directory, the bug it exists to fix.
        raise ValueError(f"{HOME_ENV} must be an absolute path, got {env!r}")
    return home


def _check_ae(value: str) -> str:
    value = value.strip()
    if not value or len(value) > _AE_MAX or "\\" in value:
        raise ValueError(f"AE title must be 1-16 characters without backslash, got {value!r}")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae)]


class TLSConfig(BaseModel):
    """DICOM TLS (TLS 1.2 or newer) of one side of qgate's associations (qgate.core.tls).

    ``dicom.tls`` (the SCP): ``certificate`` and ``private_key`` are qgate's; a client
    presenting a certificate must chain to ``ca_bundle``, and with
    ``require_client_certificate`` a client without one is refused.
    ``archive.tls`` (the SCU): the archive's certificate is always verified, against
    ``ca_bundle`` (unset: the system's CAs) and for ``server_hostname`` (unset:
    ``archive.host``); ``certificate``/``private_key`` are presented when set, and
    ``require_client_certificate`` says the archive demands them (checked at load).
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    certificate: Path | None = None  # PEM
    private_key: Path | None = None  # PEM, unencrypted (the service starts unattended)
    ca_bundle: Path | None = None  # PEM file of trusted CA certificates
    require_client_certificate: bool = False
    # SCU only: the name the archive's certificate must carry.
    server_hostname: str | None = None

    @model_validator(mode="after")
    def _check_pair(self) -> TLSConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("tls.certificate and tls.private_key are set together")
        if self.enabled and self.require_client_certificate and self.certificate is None:
            # On the SCP it is qgate's own certificate; on the SCU the one the archive wants.
            raise ValueError("tls.require_client_certificate needs tls.certificate")
        return self


class AllowedPeer(BaseModel):
    """A calling AE title and the address (or network, CIDR) it must call from."""

    model_config = ConfigDict(extra="forbid")

    ae_title: AETitle
    host: str

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        import ipaddress

        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            # Names would need DNS at every association and can be spoofed: addresses only.
            raise ValueError(f"allowed_peers host must be an IP address or network: {exc}") from exc
        return value


#: pynetdicom internals the receive path can replace (qgate.receive.reactor.INTERNALS and
#: ``file_header``, qgate.receive.part10).
ReceiveInternal = Literal["reactor", "dul", "store_response", "file_header"]
RECEIVE_INTERNALS: tuple[ReceiveInternal, ...] = get_args(ReceiveInternal)


class DicomConfig(BaseModel):
    ae_title: AETitle = "QGATE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    # Empty list accepts any calling AE title.
    allowed_calling_aets: list[str] = Field(default_factory=list)
    # Empty list: any (AE title, address) pair. Else an association is accepted only from
    # a calling AE title and address listed together (A-ASSOCIATE-RJ otherwise).
    allowed_peers: list[AllowedPeer] = Field(default_factory=list)
    # Refuse associations whose called AE title is not ae_title (A-ASSOCIATE-RJ).
    require_called_aet: bool = True
    # Associations served at once on this node, all receiver processes together; more are
    # refused (transient, local limit exceeded).
    maximum_associations: int = Field(10, ge=1)
    # Receiver processes sharing the listening socket (qgate/receive/listener.py): each
    # association is served by one of them, so parallel associations use several cores.
    receivers: int = Field(1, ge=1, le=64)
    # pynetdicom internals the receive path replaces for speed (qgate/receive/reactor.py,
    # storersp.py, part10.py); benchmarks/receive.py --without NAME measures each. Not a
    # tuning knob: leave the default.
    internals: list[ReceiveInternal] = Field(default_factory=lambda: list(RECEIVE_INTERNALS))
    tls: TLSConfig = Field(default_factory=TLSConfig)
    # Seconds an idle association may stay open before pynetdicom aborts it.
    network_timeout: float = 60.0
    # On stop, open associations may go on this long (no new ones are accepted); those
    # still open are then aborted, after the C-STORE in hand is stored or refused
    # (qgate/receive/drain.py). Below qgate serve's 90 s stop timeout.
    stop_grace_seconds: float = Field(10.0, ge=0, le=60)
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
    tls: TLSConfig = Field(default_factory=TLSConfig)


class SeriesConfig(BaseModel):
    # A series is complete after this many seconds with no new instance.
    stable_seconds: float = Field(60.0, ge=0)
    # Once every association that sent to a series has been released, wait only this long.
    release_grace_seconds: float = Field(5.0, ge=0)
    # How often the assembler looks for complete series.
    poll_seconds: float = Field(1.0, gt=0)


class DatabaseConfig(BaseModel):
    # Unset: SQLite (WAL) at <home>/qgate.db (see default_home).
    url: str = Field(default_factory=lambda: f"sqlite:///{default_home() / 'qgate.db'}")
    echo: bool = False


class StorageConfig(BaseModel):
    # spool/, outgoing/, quarantine/, models/ and the web key. Unset: default_home().
    root: Path = Field(default_factory=default_home)
    # fsync each instance under its final name before answering Success (power-loss
    # safety): one flush, which on ext4/XFS/btrfs also commits the rename (qgate/core/spool.py).
    fsync: bool = True
    # Also fsync the folder after each rename: POSIX-strict, a second flush per instance,
    # for file systems that do not journal a rename with the file (e.g. some NFS setups).
    fsync_directory: bool = False
    # With fsync on, start each received file's disk write as soon as it is written and
    # evict its pages from the page cache once it is on disk: the spool is read once,
    # later, and new instances then reuse memory instead of growing the cache
    # (qgate/core/spool.py).
    drop_page_cache: bool = True
    # Free-space watermark of the file system under root, in MiB: below it new
    # associations are refused (A-ASSOCIATE-RJ, transient, local limit exceeded) and
    # /healthz answers 503 with the reason, until space is freed (qgate purge). 0: off.
    min_free_mb: int = Field(1024, ge=0)


class QueueConfig(BaseModel):
    lease_seconds: float = Field(120.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    workers: int = Field(1, ge=1)
    poll_seconds: float = Field(0.5, gt=0)
    # Series each worker thread claims and decodes while it scores another, their leases
    # renewed meanwhile (qgate/score/prefetch.py); 0: claim, decode and score one at a
    # time. Unset: 1 on CPU; on CUDA one per decoder process.
    prefetch: int | None = Field(None, ge=0)
    # Processes that decode those series (DICOM parsing is single-threaded Python); 0:
    # decode in threads of the worker process. Unset: 0 on CPU; on CUDA half the cores,
    # at most 8.
    decode_processes: int | None = Field(None, ge=0)


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
#:
#: The learned models (``mdiqa``, ``n2q``, ``chestiqa``) have no default limit: a
#: ``Threshold`` on any of their outputs works, but none ships on. Evaluation behind that
#: choice (issue 10, training/reports/REPORT.md, held-out real CT through an independent
#: simulator): MD-IQA and Noise2Quality rank true SSIM better than the noise sigma
#: (round 5: Spearman 0.94 / 0.89 routine, 0.94 / 0.93 sharp kernel, against 0.76 / 0.61),
#: but an SSIM-like output ranks a routine sharp-kernel series (n2q.mean_quality 0.76-0.92,
#: mdiqa.score 2.98-3.55) below a 5 %-dose smooth one (0.78-0.92, 3.03-3.50), and neither
#: dose class separates kernels, so no limit passes the first and flags the second.
#: ``{scorer: n2q, output: mean_quality, min: 0.75}`` passes every routine series there,
#: flags 7/8 at 5 % dose with a sharp kernel and 5/8 at 1/16 views, 0/8 at 5 % dose with
#: a smooth kernel (config.yaml shows it). The classical noise limit stays the default
#: for low dose with soft-tissue kernels; it also flags sharp kernels (see above).
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
    # A series whose scoring failed for good (its job parked): "forward" sends the
    # originals unscored (fail open), "hold" keeps them until released (fail closed).
    # Unset: forward in forward mode, hold in gate mode (observe never sends originals).
    on_failure: Literal["forward", "hold"] | None = None

    @property
    def failure_action(self) -> Literal["forward", "hold"] | None:
        """What happens to a failed series' originals; None in observe mode."""
        if self.mode == "observe":
            return None
        return self.on_failure or ("forward" if self.mode == "forward" else "hold")


class LearnedScorerConfig(BaseModel):
    """Settings of one learned scorer (``mdiqa``, ``n2q``, ``chestiqa``;
    :mod:`qgate.score.scorers.learned`).

    A scorer refuses to start without its weights file: qgate never scores with untrained
    weights.
    """

    model_config = ConfigDict(extra="forbid")

    # safetensors file; unset: the shipped qgate/weights/<scorer>.safetensors.
    weights: Path | None = None
    # Model entry point (e.g. "n2q_tiny") for a weights file that does not name its model
    # (qgate_model metadata, written by the training exporter); unset: whichever
    # registered variant of the family the file fits. Must agree with a file that does.
    variant: str | None = None
    # bf16 autocast: always on CUDA; on CPU only where it has native bf16 instructions
    # (AVX512-BF16 / AMX: ~2x faster convolutions there), else fp32. false: fp32 everywhere.
    amp: bool = True


class SliceScorerConfig(LearnedScorerConfig):
    """A learned scorer that reads one slice at a time (``mdiqa``, ``n2q``)."""

    # Slices per forward pass. Unset: 16 on CPU, 64 on CUDA (fills an H100 with the shipped
    # models; benchmarks/score.py --batch-size measures others).
    batch_size: int | None = Field(None, ge=1)
    # Score at most this many slices, evenly spaced, first and last always included (the
    # same spread as the SC images); the other slices get null per-slice values. 64
    # slices estimate a series mean closely and keep long series within the CPU budget.
    # Unset: every slice.
    max_slices: int | None = Field(64, ge=2)


class ChestScorerConfig(LearnedScorerConfig):
    """Chest CT-IQA (``chestiqa``)."""

    # P(high dose) at or above which ``dose_class`` reads "high". Where the edge between the
    # classes lies is a convention of what routine dose is, and scanners differ
    # (training/reports/REPORT.md, round 9): a site that checks the class on its own
    # reviewed series moves it here. ``high_dose_probability`` is reported either way.
    high_dose_probability: float = Field(0.5, gt=0.0, lt=1.0)


class ScoringConfig(BaseModel):
    # The physics scorers, then every learned family (qgate.core.families).
    scorers: list[str] = Field(default_factory=lambda: ["noise", "snr", *FAMILY_NAMES])
    # Where the learned scorers run: "auto" takes CUDA when available.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch CPU threads for the learned scorers; unset: torch's default (one per core).
    torch_threads: int | None = Field(None, ge=1)
    mdiqa: SliceScorerConfig = Field(default_factory=SliceScorerConfig)
    # Noise2Quality costs ~10x MD-IQA per slice on CPU, and its series mean barely moves
    # with the sample: on held-out real series (134-275 slices) 32 slices gave every
    # slice's mean to within 0.001 (training/reports/REPORT.md, round 5).
    n2q: SliceScorerConfig = Field(default_factory=lambda: SliceScorerConfig(max_slices=32))
    chestiqa: ChestScorerConfig = Field(default_factory=ChestScorerConfig)

    def learned(self, name: str) -> LearnedScorerConfig:
        """The settings of the learned family ``name`` (``scoring.<name>``)."""
        family(name)  # KeyError for a name that is no family
        config: LearnedScorerConfig = getattr(self, name)
        return config


# One settings field per family, of the kind the family reads (per slice or whole series).
for _f in FAMILIES:
    _kind = SliceScorerConfig if _f.per_slice else LearnedScorerConfig
    _ann = ScoringConfig.model_fields[_f.name].annotation
    # a subclass may add settings (ChestScorerConfig); a whole-series family never reads slices
    if not (isinstance(_ann, type) and issubclass(_ann, _kind)) or (
        not _f.per_slice and issubclass(_ann, SliceScorerConfig)
    ):
        raise RuntimeError(f"ScoringConfig.{_f.name} must be a {_kind.__name__}")


class ReportConfig(BaseModel):
    """The report objects written for each scored series (:mod:`qgate.report.write`)."""

    model_config = ConfigDict(extra="forbid")

    # Images each scorer's measurement group in the SR names as its source (TID 1501):
    # "scored" lists the slices its series values come from when that is not every slice
    # (a subsampled model's scored slices, the slices a classical measure could measure)
    # and none when it is every slice (the measurements then derive from all the images
    # the document references); "all" lists every instance in every group (one IMAGE item
    # per slice per scorer: ~1500 for a 300-slice series, slower to build and to read).
    sr_source_images: Literal["scored", "all"] = "scored"


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
    # Login throttling: after this many failed logins for one user name (known or not)
    # within login_window_minutes, further attempts for that name are refused without a
    # password check until the oldest failure leaves the window; likewise per client
    # address with login_max_failures_per_address. Counted from the audit log, so every
    # node of an installation sees the same count.
    login_max_failures: int = Field(5, ge=1)
    login_max_failures_per_address: int = Field(20, ge=1)
    login_window_minutes: float = Field(15.0, gt=0)


class RetentionConfig(BaseModel):
    """What ``qgate purge`` and the scheduled purge delete (qgate.housekeeping.retention).

    Ages are in days (fractions allowed; 0: at the next run); null keeps that kind of data
    forever. Nothing unsent or unscored is deleted, whatever the ages: spool originals go
    only from a scored series that is not held and has no unsent or dead send, and
    outgoing files only once their send succeeded.
    """

    model_config = ConfigDict(extra="forbid")

    # Run the purge on `cron` inside `qgate serve`.
    enabled: bool = True
    cron: str = "17 * * * *"
    # Spool originals of a series, this long after the archive acknowledged every one of
    # them (forward and gate modes).
    delivered_originals_days: float | None = Field(1.0, ge=0)
    # Spool originals of a series qgate does not forward (observe mode), this long after
    # it was scored. Retraining reads reviewed series from the spool: a purged series no
    # longer trains.
    scored_originals_days: float | None = Field(30.0, ge=0)
    # Files under outgoing/ (SR, quality maps), this long after their send succeeded.
    # The review app's quality-map views read them.
    sent_outgoing_days: float | None = Field(30.0, ge=0)
    # Rows of the bookkeeping trail (events).
    events_days: float | None = Field(365.0, ge=0)
    # Rows of the review app's audit log; unset by default (a compliance record).
    audit_days: float | None = Field(None, ge=0)

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        return _check_crontab(value, "retention.cron")


class RetrainConfig(BaseModel):
    """The nightly retraining (``qgate.retrain``): when it runs and how a candidate wins.

    Units: ``margin`` is in the units of the comparison metric (Overall = |PLCC| + |SROCC|
    + |KROCC|, 0-3, higher is better; MAE in MD-IQA score units 0-4 when the held-out set
    is too small for correlations), and the candidate must beat the current model by more.
    """

    enabled: bool = True
    # 5-field crontab (minute hour day month weekday), local time of the service.
    cron: str = "0 2 * * *"
    margin: float = Field(0.02, ge=0)
    # Share of the reviewed patients (series without a patient ID count as their own
    # patient) held out for the comparison; chosen by hash, so stable from run to run.
    held_out_fraction: float = Field(0.25, gt=0, lt=1)
    # Fewer reviewed series than this: no candidate, the run is rejected with the reason.
    min_reviewed: int = Field(4, ge=2)
    # Held-out items below this (or constant labels): compare by MAE, not correlations.
    min_correlation_items: int = Field(8, ge=3)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    # Slices per series used for training and evaluation (evenly spaced).
    slices_per_series: int = Field(8, ge=2)
    # Unreviewed series scored in the last N days join as unlabelled data (0: none).
    recent_unreviewed_days: float = Field(7.0, ge=0)
    max_unreviewed_series: int = Field(50, ge=0)
    pseudo_label_weight: float = Field(0.5, ge=0)
    # An MD-IQA folder from `qgate-train data build --task mdiqa` (the physics simulator):
    # its train split joins the training set and its test split the held-out set.
    simulated_dir: Path | None = None
    # Refit Chest CT-IQA's linear quality module on the reviewed scores (mapped to 1-10).
    refit_chestiqa: bool = True
    seed: int = 0
    # The training process the service runs (qgate.retrain.child), before its --labels
    # and --out arguments; unset: this Python's `-m training.cli retrain` (qgate-train
    # retrain). Set it to run the training in another environment, e.g. one with CUDA.
    command: list[str] | None = None
    # A training process still running after this long is stopped; the run fails.
    timeout_hours: float = Field(6.0, gt=0)
    # Threads the training process may use (torch, OpenMP, MKL, OpenBLAS); unset: half
    # the cores this process may run on, at least 1, so a node that also scores keeps
    # the rest for its workers.
    threads: int | None = Field(None, ge=1)

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        return _check_crontab(value, "retrain.cron")


def _check_crontab(value: str, key: str) -> str:
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(value)
    except ValueError as exc:
        raise ValueError(f"{key} {value!r} is not a 5-field crontab: {exc}") from exc
    return value


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
    report: ReportConfig = Field(default_factory=ReportConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

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
