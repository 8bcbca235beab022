"""Configuration: keyword arguments first, then environment variables, then defaults.

Every field of :class:`Config` names the variables it reads in its metadata; the README's
configuration table is generated from it (:func:`markdown_table`) and checked by a test. A bad
environment value logs one warning naming the variable (never the value of a secret) and the
default is used; a bad keyword argument is a programming error and raises ``ValueError``.

Over 400 lines: one documented field per option (about forty), declared in this one place.

Example::

    cfg = Config.resolve(service_name="llama-ft", prometheus_port=9500)
    cfg.prometheus_port  # 9500, whatever OTEL_EXPORTER_PROMETHEUS_PORT says
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from otel_ml import _envparse as p
from otel_ml._settings import option, resolve_values, table_rows
from otel_ml.anomaly_config import AnomalyConfig

PROTOCOLS = ("grpc", "http/protobuf")


_opt = option


@dataclass
class Config:
    """Resolved otel_ml settings. Build it with :meth:`Config.resolve`; ``init()`` does.

    Example::

        cfg = Config.resolve(env={"OTEL_EXPORTER_PROMETHEUS_PORT": "9600"})
        assert cfg.prometheus_port == 9600
    """

    enabled: bool = field(
        default=True,
        metadata=_opt(
            ("OTEL_SDK_DISABLED",),
            lambda raw: not p.parse_bool(raw),
            "Turn all of otel_ml off (`OTEL_SDK_DISABLED=true`): calls become no-ops.",
        ),
    )
    service_name: str = field(
        default="otel-ml",
        metadata=_opt(("OTEL_SERVICE_NAME",), p.parse_str, "`service.name` resource attribute."),
    )
    run_id: str | None = field(
        default=None,
        metadata=_opt(
            ("OTEL_ML_RUN_ID",),
            p.parse_str,
            "Run id shared by all ranks (label `run_id`). Unset: `TORCHELASTIC_RUN_ID`, "
            "`slurm-<SLURM_JOB_ID>[.<SLURM_STEP_ID>]`, `job-<digest of MASTER_ADDR:MASTER_PORT:"
            "WORLD_SIZE>`, else a new time-based id.",
            "derived",
        ),
    )
    rank: int | None = field(
        default=None,
        metadata=_opt((), int, "Global rank. Unset: torch.distributed, `RANK`, `SLURM_PROCID`.", "detected"),
    )
    local_rank: int | None = field(
        default=None,
        metadata=_opt((), int, "Rank on this node: `LOCAL_RANK`, `SLURM_LOCALID`.", "detected"),
    )
    world_size: int | None = field(
        default=None,
        metadata=_opt((), int, "World size: torch.distributed, `WORLD_SIZE`, `SLURM_NTASKS`.", "detected"),
    )
    run_dir: str = field(
        default="otel-ml-runs/{run_id}",
        metadata=_opt(
            ("OTEL_ML_RUN_DIR",),
            p.parse_str,
            "Directory of this run's files (port files, OTLP-JSON lines); `{run_id}` is expanded.",
        ),
    )
    prometheus: bool = field(
        default=True,
        metadata=_opt(("OTEL_ML_PROMETHEUS",), p.parse_bool, "Serve `/metrics` on every rank."),
    )
    prometheus_host: str = field(
        default="localhost",
        metadata=_opt(
            ("OTEL_EXPORTER_PROMETHEUS_HOST",),
            p.parse_str,
            "Bind address of `/metrics` (use `0.0.0.0` to let other hosts scrape).",
        ),
    )
    prometheus_port: int = field(
        default=9464,
        metadata=_opt(
            ("OTEL_EXPORTER_PROMETHEUS_PORT",),
            p.int_parser(0, 65535),
            "Base port: a rank serves base + local rank; a taken port moves to the next free one. "
            "0 picks any free port.",
        ),
    )
    prometheus_port_attempts: int = field(
        default=64,
        metadata=_opt(
            ("OTEL_ML_PROMETHEUS_PORT_ATTEMPTS",),
            p.int_parser(1, 1000),
            "How many successive ports to try before giving up on `/metrics` (with a warning).",
        ),
    )
    prometheus_tls_cert: str | None = field(
        default=None,
        metadata=_opt(
            ("OTEL_ML_PROMETHEUS_TLS_CERT",),
            p.parse_str,
            "PEM certificate: serve `/metrics` over HTTPS (with `prometheus_tls_key`).",
            "unset",
        ),
    )
    prometheus_tls_key: str | None = field(
        default=None,
        metadata=_opt(
            ("OTEL_ML_PROMETHEUS_TLS_KEY",), p.parse_str, "PEM private key of that certificate.", "unset"
        ),
    )
    prometheus_basic_auth: str | None = field(
        default=None,
        repr=False,
        metadata=_opt(
            ("OTEL_ML_PROMETHEUS_BASIC_AUTH",),
            p.parse_str,
            "`user:password` required by `/metrics` and `/progress` (constant-time check); never logged.",
            "unset",
        ),
    )
    prometheus_basic_auth_file: str | None = field(
        default=None,
        metadata=_opt(
            ("OTEL_ML_PROMETHEUS_BASIC_AUTH_FILE",),
            p.parse_str,
            "File holding `user:password` (keeps the secret out of the environment).",
            "unset",
        ),
    )
    prometheus_max_connections: int = field(
        default=16,
        metadata=_opt(
            ("OTEL_ML_PROMETHEUS_MAX_CONNECTIONS",),
            p.int_parser(2, 1024),
            "Simultaneous `/metrics` connections; at the cap the oldest idle one is closed.",
        ),
    )
    handle_signals: bool = field(
        default=True,
        metadata=_opt(
            ("OTEL_ML_HANDLE_SIGNALS",),
            p.parse_bool,
            "On SIGTERM flush (bounded by `shutdown_timeout`), then run the previous handler or "
            "exit as the signal would.",
        ),
    )
    otlp_endpoint: str | None = field(
        default=None,
        metadata=_opt(
            ("OTEL_EXPORTER_OTLP_ENDPOINT",),
            p.parse_str,
            "Collector base URL; setting it turns OTLP export on (`/v1/traces`, `/v1/metrics` "
            "are appended for http/protobuf).",
            "unset",
        ),
    )
    otlp_traces_endpoint: str | None = field(
        default=None,
        metadata=_opt(
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",),
            p.parse_str,
            "Full URL for spans, used as is.",
            "unset",
        ),
    )
    otlp_metrics_endpoint: str | None = field(
        default=None,
        metadata=_opt(
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",),
            p.parse_str,
            "Full URL for metrics, used as is.",
            "unset",
        ),
    )
    otlp_protocol: str = field(
        default="http/protobuf",
        metadata=_opt(
            ("OTEL_EXPORTER_OTLP_PROTOCOL",), p.choice_parser(*PROTOCOLS), "`grpc` or `http/protobuf`."
        ),
    )
    otlp_headers: dict[str, str] = field(
        default_factory=dict,
        repr=False,
        metadata=_opt(
            ("OTEL_EXPORTER_OTLP_HEADERS",),
            p.parse_headers,
            "`key=value,...` sent with every export; never logged or written to files.",
            "none",
        ),
    )
    otlp_timeout: float = field(
        default=10.0,
        metadata=_opt(
            ("OTEL_EXPORTER_OTLP_TIMEOUT",),
            p.seconds_parser(1000, 0.001),
            "Per-export timeout, milliseconds in the variable, seconds as a kwarg.",
            "10000 ms",
        ),
    )
    otlp_insecure: bool | None = field(
        default=None,
        metadata=_opt(
            ("OTEL_EXPORTER_OTLP_INSECURE",),
            p.parse_bool,
            "gRPC without TLS; unset: decided by the endpoint scheme (`http` = insecure).",
            "from scheme",
        ),
    )
    otlp_certificate: str | None = field(
        default=None,
        metadata=_opt(
            ("OTEL_EXPORTER_OTLP_CERTIFICATE",), p.parse_str, "CA bundle for TLS to the collector.", "unset"
        ),
    )
    files: str = field(
        default="auto",
        metadata=_opt(
            ("OTEL_ML_FILES",),
            p.choice_parser("auto", "on", "off"),
            "OTLP-JSON lines in the run dir: `auto` = only when no OTLP endpoint is set.",
        ),
    )
    file_max_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_opt(
            ("OTEL_ML_FILE_MAX_BYTES",),
            p.int_parser(4096),
            "Size at which a run-dir file is rotated.",
            "67108864 (64 MiB)",
        ),
    )
    file_backups: int = field(
        default=2,
        metadata=_opt(
            ("OTEL_ML_FILE_BACKUPS",),
            p.int_parser(0, 100),
            "Rotated files kept per signal and rank; disk use is bounded by max bytes x (backups + 1).",
        ),
    )
    metric_export_interval: float = field(
        default=15.0,
        metadata=_opt(
            ("OTEL_METRIC_EXPORT_INTERVAL",),
            p.seconds_parser(1000, 0.05),
            "Push interval for OTLP and file metrics, milliseconds in the variable, seconds as a kwarg.",
            "15000 ms",
        ),
    )
    span_queue_size: int = field(
        default=2048,
        metadata=_opt(
            ("OTEL_BSP_MAX_QUEUE_SIZE",),
            p.int_parser(1),
            "Finished spans buffered per exporter; more are dropped and counted.",
        ),
    )
    span_export_delay: float = field(
        default=5.0,
        metadata=_opt(
            ("OTEL_BSP_SCHEDULE_DELAY",),
            p.seconds_parser(1000, 0.05),
            "Delay between span exports, milliseconds in the variable.",
            "5000 ms",
        ),
    )
    trace_every: int = field(
        default=100,
        metadata=_opt(
            ("OTEL_ML_TRACE_EVERY",),
            p.int_parser(0),
            "Trace every Nth step in full (root span + region spans; 0: none). Spans are built off "
            "the training thread.",
        ),
    )
    tail_factor: float = field(
        default=2.0,
        metadata=_opt(
            ("OTEL_ML_TAIL_FACTOR",),
            p.seconds_parser(1, 0.0),
            "Also trace every step longer than this factor times the median of the rank's recent "
            "steps (tail sampling); 0 turns it off.",
        ),
    )
    max_span_paths: int = field(
        default=1024,
        metadata=_opt(
            ("OTEL_ML_MAX_SPAN_PATHS",),
            p.int_parser(1),
            "Distinct region paths per process; later new paths are counted under `(overflow)`.",
        ),
    )
    fold_layer_indices: bool = field(
        default=True,
        metadata=_opt(
            ("OTEL_ML_FOLD_LAYER_INDICES",),
            p.parse_bool,
            "Export `layers.17` as `layers.*` in the `path` label (one layer's series, not one per "
            "layer); traces and the summary keep the index.",
        ),
    )
    cuda_timing: str = field(
        default="auto",
        metadata=_opt(
            ("OTEL_ML_CUDA_TIMING",),
            p.choice_parser("auto", "on", "off"),
            "Time regions with CUDA events (resolved later, no sync) once the training code has "
            "initialised CUDA (otel_ml never does); `on` is the same as `auto`.",
        ),
    )
    timing_table: bool = field(
        default=False,
        metadata=_opt(
            ("OTEL_ML_TIMING_TABLE",),
            p.parse_bool,
            "Show the live top-paths table on rank 0's terminal (plain lines when not a terminal).",
        ),
    )
    timing_table_every: int = field(
        default=50,
        metadata=_opt(("OTEL_ML_TIMING_TABLE_EVERY",), p.int_parser(1), "Steps between table refreshes."),
    )
    timing_table_top: int = field(
        default=10,
        metadata=_opt(("OTEL_ML_TIMING_TABLE_TOP",), p.int_parser(1), "Paths shown in the table."),
    )
    summary: bool = field(
        default=True,
        metadata=_opt(
            ("OTEL_ML_SUMMARY",),
            p.parse_bool,
            "At shutdown, write the timing summary to the run dir (JSON and text) and print it on rank 0.",
        ),
    )
    progress_view: str = field(
        default="auto",
        metadata=_opt(
            ("OTEL_ML_PROGRESS_VIEW",),
            p.choice_parser("auto", "on", "off"),
            "Rank 0's terminal view of every rank's progress bars: `auto` = when world size > 1.",
        ),
    )
    progress_view_interval: float = field(
        default=1.0,
        metadata=_opt(
            ("OTEL_ML_PROGRESS_VIEW_INTERVAL",),
            p.seconds_parser(1, 0.1),
            "Seconds between refreshes of the rank view on a terminal.",
        ),
    )
    progress_log_interval: float = field(
        default=30.0,
        metadata=_opt(
            ("OTEL_ML_PROGRESS_LOG_INTERVAL",),
            p.seconds_parser(1, 1.0),
            "Seconds between compact rank-view lines when stdout is not a terminal.",
        ),
    )
    status_interval: float = field(
        default=10.0,
        metadata=_opt(
            ("OTEL_ML_STATUS_INTERVAL",),
            p.seconds_parser(1, 0.0),
            "Seconds between rewrites of the rank's `status.json` in the run dir (state, step, ETA, "
            "anomalies; also written at exit); 0 turns the file off.",
        ),
    )
    max_progress_tasks: int = field(
        default=64,
        metadata=_opt(
            ("OTEL_ML_MAX_PROGRESS_TASKS",),
            p.int_parser(1),
            "Distinct progress-bar tasks (label `task`) per process; later ones export as `(overflow)`.",
        ),
    )
    throughput_window: int = field(
        default=20,
        metadata=_opt(
            ("OTEL_ML_THROUGHPUT_WINDOW",),
            p.int_parser(2),
            "Steps in the rolling window of samples/s and tokens/s.",
        ),
    )
    max_metric_keys: int = field(
        default=256,
        metadata=_opt(
            ("OTEL_ML_MAX_METRIC_KEYS",),
            p.int_parser(1),
            "Distinct keys log() turns into metrics; more are dropped with one warning.",
        ),
    )
    distribution_buckets: dict[str, tuple[float, ...]] = field(
        default_factory=dict,
        metadata=_opt(
            ("OTEL_ML_DISTRIBUTION_BUCKETS",),
            p.parse_buckets,
            "Histogram bounds of distributions passed to log(), per key: `reward=0,0.25,0.5,1;score=1,5,10`. "
            "Other keys: -100 to 100, finer near 0.",
            "symmetric -100..100",
        ),
    )
    score_print: str = field(
        default="batch",
        metadata=_opt(
            ("OTEL_ML_SCORE_PRINT",),
            p.choice_parser("off", "batch", "sample"),
            "What otel_ml.scores() prints on the rank's terminal: `off`, `batch` (a line per batch and "
            "the final summary) or `sample` (also a line per sample); `show=` overrides it per call.",
        ),
    )
    shutdown_timeout: float = field(
        default=5.0,
        metadata=_opt(
            ("OTEL_ML_SHUTDOWN_TIMEOUT",),
            p.seconds_parser(1, 0.1),
            "Upper bound, in seconds, on shutdown() and the at-exit flush, whatever the collector does.",
        ),
    )
    resource_attributes: dict[str, str] = field(
        default_factory=dict,
        metadata=_opt(
            ("OTEL_RESOURCE_ATTRIBUTES",),
            p.parse_attributes,
            "Extra resource attributes, `key=value,...`.",
            "none",
        ),
    )
    anomalies: Any = field(
        default=None,
        repr=False,
        metadata={"doc": "Anomaly-detector settings (AnomalyConfig); its options are accepted flat."},
    )
    set_global_providers: bool = field(
        default=True,
        metadata=_opt(
            (),
            bool,
            "Install the providers as the OTel globals (kwarg only) when none is set yet, "
            "so other OTel instrumentation shares the pipeline.",
        ),
    )

    def __post_init__(self) -> None:
        if self.anomalies is None:
            self.anomalies = AnomalyConfig()
        if self.otlp_protocol not in PROTOCOLS:
            raise ValueError(f"otlp_protocol must be one of {PROTOCOLS}, not {self.otlp_protocol!r}")
        if self.files not in ("auto", "on", "off"):
            raise ValueError(f"files must be 'auto', 'on' or 'off', not {self.files!r}")
        if not 0 <= self.prometheus_port <= 65535:
            raise ValueError(f"prometheus_port must be in 0..65535, not {self.prometheus_port}")
        for name in ("metric_export_interval", "shutdown_timeout", "otlp_timeout", "span_export_delay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        for name in ("throughput_window", "max_metric_keys", "span_queue_size", "file_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        self.distribution_buckets = {
            k: p.check_buckets(tuple(float(b) for b in v)) for k, v in self.distribution_buckets.items()
        }
        if self.trace_every < 0:
            raise ValueError("trace_every must be >= 0")
        if self.tail_factor < 0:
            raise ValueError("tail_factor must be >= 0")
        interval = self.status_interval
        if not (isinstance(interval, (int, float)) and 0 <= interval < float("inf")):
            raise ValueError(f"status_interval must be 0 (off) or a number of seconds, not {interval!r}")
        if self.progress_view not in ("auto", "on", "off"):
            raise ValueError(f"progress_view must be 'auto', 'on' or 'off', not {self.progress_view!r}")
        if self.score_print not in ("off", "batch", "sample"):
            raise ValueError(f"score_print must be 'off', 'batch' or 'sample', not {self.score_print!r}")
        if self.cuda_timing not in ("auto", "on", "off"):
            raise ValueError(f"cuda_timing must be 'auto', 'on' or 'off', not {self.cuda_timing!r}")

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> Config:
        """Build a Config: ``kwargs`` win, then ``env`` (default ``os.environ``), then defaults.

        ``None`` as a keyword value means "not given". Anomaly-detector options (see
        :class:`otel_ml.anomaly_config.AnomalyConfig`) are accepted flat. Unknown keywords raise
        ``TypeError``.
        """
        env = os.environ if env is None else env
        own = {f.name for f in dataclasses.fields(cls)}
        detector = {f.name for f in dataclasses.fields(AnomalyConfig)}
        unknown = sorted(set(kwargs) - own - detector)
        if unknown:
            raise TypeError(f"unknown otel_ml option(s): {', '.join(unknown)}")
        values = resolve_values(cls, env, kwargs)
        if kwargs.get("anomalies") is not None:
            values["anomalies"] = kwargs["anomalies"]
        else:
            values["anomalies"] = AnomalyConfig.resolve(
                env, **{k: v for k, v in kwargs.items() if k in detector}
            )
        return cls(**values)

    @property
    def otlp_enabled(self) -> bool:
        """True when any OTLP endpoint is configured."""
        return bool(self.otlp_endpoint or self.otlp_traces_endpoint or self.otlp_metrics_endpoint)

    @property
    def files_enabled(self) -> bool:
        """Whether OTLP-JSON files are written (``auto`` means: when no OTLP endpoint is set)."""
        return self.files == "on" or (self.files == "auto" and not self.otlp_enabled)


def markdown_table() -> str:
    """The README configuration table, generated from :class:`Config` and its anomaly options."""
    header = ["| option (kwarg) | environment | default | meaning |", "|---|---|---|---|"]
    return "\n".join(header + table_rows(Config) + table_rows(AnomalyConfig))
