"""Every metric, span and attribute name otel_ml emits, with its unit and help text.

This module is the single source of truth for names. Instrument names are chosen so that the
OpenTelemetry Prometheus exporter exposes exactly the documented Prometheus name: the exporter
appends a unit suffix unless the name already ends with it (``s`` -> ``_seconds``, ``By`` ->
``_bytes``, ``{x}/s`` -> ``_per_second``, ``1`` and ``{x}`` -> nothing) and appends ``_total``
to counters. ``tests/test_semconv.py`` checks the README table against :data:`METRICS`, and the
integration tests check the names against a real ``/metrics`` scrape.

Over 400 lines: one table of every name, the integrations' included, is the point of the module.

Example::

    from otel_ml import semconv
    semconv.LOSS.prometheus_name  # 'otel_ml_loss'
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "otel_ml_"

#: Label carried by every otel_ml series: the global rank of the process.
LABEL_RANK = "rank"
#: Label carried by every otel_ml series: the run id shared by all ranks of a job.
LABEL_RUN_ID = "run_id"
LABEL_DEVICE = "device"
LABEL_METRIC = "metric"
LABEL_EXPORTER = "exporter"
LABEL_SIGNAL = "signal"
LABEL_PATH = "path"
LABEL_REASON = "reason"
LABEL_TASK = "task"
LABEL_UNIT = "unit"
LABEL_PARENT = "parent"
LABEL_TYPE = "type"
#: Labels of ``otel_ml_gpu_info``, named like the DCGM exporter's where it has one.
LABEL_GPU_UUID = "gpu_uuid"
LABEL_PCI_BUS_ID = "pci_bus_id"
LABEL_GPU_NAME = "gpu_name"
LABEL_HOST = "host"
#: Labels of the integrations' series (``otel_ml.integrations``).
LABEL_TAG = "tag"
LABEL_OPERATION = "operation"
LABEL_OUTCOME = "outcome"
LABEL_ROLE = "role"
LABEL_STATE = "state"

# Resource attributes (OTel semantic conventions where they exist, ``otel_ml.*`` otherwise).
RESOURCE_RUN_ID = "otel_ml.run_id"
RESOURCE_RANK = "otel_ml.rank"
RESOURCE_LOCAL_RANK = "otel_ml.local_rank"
RESOURCE_WORLD_SIZE = "otel_ml.world_size"

# Spans.
SPAN_STEP = "otel_ml.step"
ATTR_STEP = "otel_ml.step"
ATTR_RANK = "otel_ml.rank"
ATTR_RUN_ID = "otel_ml.run_id"
#: Prefix of span attributes holding the scalars logged for that step (``otel_ml.value.loss``).
ATTR_VALUE_PREFIX = "otel_ml.value."
#: Why a step was traced: ``every`` (every Nth step) or ``slow`` (tail sampling).
ATTR_SAMPLED_BY = "otel_ml.sampled_by"
#: Full hierarchy path of a region span (the span name is the last path part).
ATTR_PATH = "otel_ml.path"
ATTR_GPU_MS = "otel_ml.gpu_duration_ms"
ATTR_HOST_MS = "otel_ml.host_duration_ms"
#: Span event added to the step an anomaly starts on (the step is traced because of it).
EVENT_ANOMALY = "otel_ml.anomaly"
ATTR_ANOMALY_TYPE = "otel_ml.anomaly.type"
ATTR_ANOMALY_KEY = "otel_ml.anomaly.key"
ATTR_ANOMALY_VALUE = "otel_ml.anomaly.value"

#: Instrumentation scope name used for every meter and tracer otel_ml creates.
SCOPE = "otel_ml"


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its OTel instrument name, unit, kind and the Prometheus name it exposes.

    Example::

        LOSS = MetricSpec("otel_ml_loss", "1", "gauge", "Last finite training loss.", "loss=")
    """

    name: str
    unit: str
    kind: str  # gauge | counter | histogram
    description: str
    source: str
    labels: tuple[str, ...] = ()

    @property
    def prometheus_name(self) -> str:
        """The name as it appears on ``/metrics`` (``_total`` added to counters)."""
        return self.name + "_total" if self.kind == "counter" else self.name


STEP = MetricSpec("otel_ml_step", "{step}", "gauge", "Last step passed to log().", "`step`")
LAST_STEP_TIMESTAMP = MetricSpec(
    "otel_ml_last_step_timestamp_seconds",
    "s",
    "gauge",
    "Unix time of the last log() call.",
    "clock at log()",
)
HEARTBEAT_TIMESTAMP = MetricSpec(
    "otel_ml_heartbeat_timestamp_seconds",
    "s",
    "gauge",
    "Unix time at which the rank's metrics were collected (each scrape or push): the liveness "
    "alerts and panels tell a live rank from a dead or frozen one by it, with any target labels "
    "and through an OTLP collector.",
    "clock at collection",
)
LOSS = MetricSpec("otel_ml_loss", "1", "gauge", "Last finite training loss.", "`loss=`")
LEARNING_RATE = MetricSpec(
    "otel_ml_learning_rate", "1", "gauge", "Last learning rate.", "`lr=` (or `learning_rate=`)"
)
GRAD_NORM = MetricSpec("otel_ml_grad_norm", "1", "gauge", "Last gradient norm.", "`grad_norm=`")
SAMPLES_PER_SECOND = MetricSpec(
    "otel_ml_samples_per_second",
    "{sample}/s",
    "gauge",
    "Samples per second over the last throughput window of steps.",
    "rolling window over `samples=`",
)
TOKENS_PER_SECOND = MetricSpec(
    "otel_ml_tokens_per_second",
    "{token}/s",
    "gauge",
    "Tokens per second over the last throughput window of steps.",
    "rolling window over `tokens=`",
)
SAMPLES = MetricSpec(
    "otel_ml_samples", "{sample}", "counter", "Samples processed (sum of samples=).", "`samples=`"
)
TOKENS = MetricSpec("otel_ml_tokens", "{token}", "counter", "Tokens processed (sum of tokens=).", "`tokens=`")
STEP_DURATION = MetricSpec(
    "otel_ml_step_duration_seconds",
    "s",
    "histogram",
    "Wall time per step, measured between log() calls for successive steps.",
    "time between log() calls",
)
GPU_MEMORY_ALLOCATED = MetricSpec(
    "otel_ml_gpu_memory_allocated_bytes",
    "By",
    "gauge",
    "CUDA memory held by tensors (torch.cuda.memory_allocated).",
    "torch.cuda memory stats at collection; absent without CUDA",
    (LABEL_DEVICE,),
)
GPU_MEMORY_RESERVED = MetricSpec(
    "otel_ml_gpu_memory_reserved_bytes",
    "By",
    "gauge",
    "CUDA memory reserved by the caching allocator (torch.cuda.memory_reserved).",
    "torch.cuda memory stats at collection; absent without CUDA",
    (LABEL_DEVICE,),
)
GPU_MEMORY_PEAK = MetricSpec(
    "otel_ml_gpu_memory_peak_bytes",
    "By",
    "gauge",
    "Peak CUDA memory held by tensors (torch.cuda.max_memory_allocated).",
    "torch.cuda memory stats at collection; absent without CUDA",
    (LABEL_DEVICE,),
)
GPU_MEMORY_TOTAL = MetricSpec(
    "otel_ml_gpu_memory_total_bytes",
    "By",
    "gauge",
    "Memory capacity of the CUDA device (torch.cuda.get_device_properties().total_memory).",
    "torch.cuda device properties; absent without CUDA",
    (LABEL_DEVICE,),
)
GPU_INFO = MetricSpec(
    "otel_ml_gpu_info",
    "1",
    "gauge",
    "1 per GPU this rank uses, with its UUID and PCI bus id: join DCGM exporter metrics on UUID.",
    "CUDA device properties",
    (LABEL_DEVICE, LABEL_GPU_UUID, LABEL_PCI_BUS_ID, LABEL_GPU_NAME, LABEL_HOST),
)
PROCESS_RESIDENT_MEMORY = MetricSpec(
    "otel_ml_process_resident_memory_bytes",
    "By",
    "gauge",
    "Resident set size of the rank's process.",
    "/proc/self/statm at collection",
)
NONFINITE = MetricSpec(
    "otel_ml_nonfinite",
    "{value}",
    "counter",
    "NaN or Inf values passed to log(), per key; the series starts at 0 when the key is first logged.",
    "NaN/Inf values passed to log()",
    (LABEL_METRIC,),
)
EXPORT_ERRORS = MetricSpec(
    "otel_ml_export_errors",
    "{error}",
    "counter",
    "Failures per exporter (otlp, files), of metric collection (collect), of background jobs (jobs) "
    "and inside timing hooks (timing; swallowed to protect the loop).",
    "exporter threads",
    (LABEL_EXPORTER,),
)
EXPORT_DROPPED = MetricSpec(
    "otel_ml_export_dropped",
    "{item}",
    "counter",
    "Telemetry items dropped because a bounded queue was full or a value was unusable.",
    "exporter queues, deferred reads, caps",
    (LABEL_SIGNAL,),
)
SPAN_DURATION = MetricSpec(
    "otel_ml_span_duration_seconds",
    "s",
    "histogram",
    "Duration of each timed region (GPU time for CUDA-timed regions, host time otherwise).",
    "`otel_ml.span()`, `trace_modules()`",
    (LABEL_PATH,),
)
SPAN_SELF = MetricSpec(
    "otel_ml_span_self_seconds",
    "s",
    "counter",
    "Time spent in a region outside its child regions; rate() over step time gives its share.",
    "`otel_ml.span()`, `trace_modules()`",
    (LABEL_PATH,),
)
SPAN_HOST = MetricSpec(
    "otel_ml_span_host_seconds",
    "s",
    "counter",
    "Host (launch) time of CUDA-timed regions; absent for regions timed on the host only.",
    "`otel_ml.span()` with CUDA timing",
    (LABEL_PATH,),
)
TRACED_STEPS = MetricSpec(
    "otel_ml_traced_steps",
    "{step}",
    "counter",
    "Steps exported as full traces, by reason: every (every Nth step) or slow (tail sampling).",
    "trace sampler",
    (LABEL_REASON,),
)
_PROGRESS_LABELS = (LABEL_TASK, LABEL_UNIT, LABEL_PARENT)
PROGRESS_COMPLETED = MetricSpec(
    "otel_ml_progress_completed",
    "{item}",
    "gauge",
    "Units done by an open progress bar (a parent bar also reports its nested bars' units).",
    "`otel_ml.tqdm` (`n`)",
    _PROGRESS_LABELS,
)
PROGRESS_TOTAL = MetricSpec(
    "otel_ml_progress_total",
    "{item}",
    "gauge",
    "Units an open progress bar expects (absent when the bar has no total).",
    "`otel_ml.tqdm` (`total`)",
    _PROGRESS_LABELS,
)
PROGRESS_RATE = MetricSpec(
    "otel_ml_progress_rate_per_second",
    "{item}/s",
    "gauge",
    "Units per second of an open progress bar (tqdm's smoothed rate).",
    "`otel_ml.tqdm`",
    _PROGRESS_LABELS,
)
PROGRESS_ETA = MetricSpec(
    "otel_ml_progress_eta_seconds",
    "s",
    "gauge",
    "Seconds left for an open progress bar at its current rate (absent without a total).",
    "`otel_ml.tqdm`",
    _PROGRESS_LABELS,
)
PROGRESS_ELAPSED = MetricSpec(
    "otel_ml_progress_elapsed_seconds",
    "s",
    "gauge",
    "Seconds since an open progress bar started.",
    "`otel_ml.tqdm`",
    _PROGRESS_LABELS,
)
PROGRESS_ACTIVE = MetricSpec(
    "otel_ml_progress_active",
    "1",
    "gauge",
    "1 while a bar with this task is open, 0 after it closed.",
    "`otel_ml.tqdm`",
    (LABEL_TASK,),
)
ANOMALY_ACTIVE = MetricSpec(
    "otel_ml_anomaly_active",
    "1",
    "gauge",
    "1 during an anomaly episode of this type on this rank, else 0 (from startup, for each type checked).",
    "in-process detectors",
    (LABEL_TYPE,),
)
ANOMALIES = MetricSpec(
    "otel_ml_anomalies",
    "{episode}",
    "counter",
    "Anomaly episodes by type: nonfinite, kl_spike, loss_spike, loss_plateau, grad_explosion, stall, "
    "distribution_drift.",
    "in-process detectors",
    (LABEL_TYPE,),
)
_DIST = "`log(key=[...])`: a list, array or tensor of more than one element"
DISTRIBUTION = MetricSpec(
    "otel_ml_distribution",
    "1",
    "histogram",
    "Finite elements of every distribution logged under a key (NaN/Inf are counted in "
    "otel_ml_nonfinite_total{metric=key}).",
    _DIST,
    (LABEL_METRIC,),
)
DISTRIBUTION_COUNT = MetricSpec(
    "otel_ml_distribution_last_size",
    "{value}",
    "gauge",
    "Finite elements of the last distribution.",
    _DIST,
    (LABEL_METRIC,),
)
DISTRIBUTION_MEAN = MetricSpec(
    "otel_ml_distribution_last_mean", "1", "gauge", "Mean of the last distribution.", _DIST, (LABEL_METRIC,)
)
DISTRIBUTION_MIN = MetricSpec(
    "otel_ml_distribution_last_min",
    "1",
    "gauge",
    "Smallest element of the last distribution.",
    _DIST,
    (LABEL_METRIC,),
)
DISTRIBUTION_MAX = MetricSpec(
    "otel_ml_distribution_last_max",
    "1",
    "gauge",
    "Largest element of the last distribution.",
    _DIST,
    (LABEL_METRIC,),
)
DISTRIBUTION_STDDEV = MetricSpec(
    "otel_ml_distribution_last_stddev",
    "1",
    "gauge",
    "Population standard deviation of the last distribution.",
    _DIST,
    (LABEL_METRIC,),
)
DISTRIBUTION_GAUGES: tuple[MetricSpec, ...] = (
    DISTRIBUTION_COUNT,
    DISTRIBUTION_MEAN,
    DISTRIBUTION_MIN,
    DISTRIBUTION_MAX,
    DISTRIBUTION_STDDEV,
)
# Series of the integrations (otel_ml.integrations): present only where one is in use.
SCALAR = MetricSpec(
    "otel_ml_scalar",
    "1",
    "gauge",
    "Last finite value written to a TensorBoard SummaryWriter, per tag (at most 256 tags; later ones "
    "are dropped and counted).",
    "`add_scalar`/`add_scalars` with `otel_ml.integrations.tensorboard`",
    (LABEL_TAG,),
)
SCALAR_NONFINITE = MetricSpec(
    "otel_ml_scalar_nonfinite",
    "{value}",
    "counter",
    "NaN or Inf values written to a TensorBoard SummaryWriter, per tag (starts at 0 with the tag).",
    "`add_scalar`/`add_scalars` with `otel_ml.integrations.tensorboard`",
    (LABEL_TAG,),
)
ELASTIC_OPERATIONS = MetricSpec(
    "otel_ml_elastic_operations",
    "{operation}",
    "counter",
    "Operations of the torchelastic agent (rendezvous, restart_workers, start_workers, ...) by outcome "
    '(success, failure); restarts are operation="restart_workers".',
    "`torch.distributed.elastic.metrics` with `otel_ml.integrations.torchelastic`",
    (LABEL_OPERATION, LABEL_OUTCOME),
)
ELASTIC_OPERATION_DURATION = MetricSpec(
    "otel_ml_elastic_operation_duration_seconds",
    "s",
    "gauge",
    "Duration of the last run of each torchelastic agent operation.",
    "`torch.distributed.elastic.metrics` with `otel_ml.integrations.torchelastic`",
    (LABEL_OPERATION,),
)
ELASTIC_REMAINING_RESTARTS = MetricSpec(
    "otel_ml_elastic_remaining_restarts",
    "{restart}",
    "gauge",
    "Restarts the torchelastic agent may still make for this worker role (of --max-restarts).",
    "`torch.distributed.elastic.metrics` with `otel_ml.integrations.torchelastic`",
    (LABEL_ROLE,),
)
ELASTIC_WORKER_STATE = MetricSpec(
    "otel_ml_elastic_worker_state",
    "1",
    "gauge",
    "1 for the state the torchelastic agent last saw its worker group in (healthy, unhealthy, failed, "
    "succeeded), 0 for the states seen before.",
    "`torch.distributed.elastic.metrics` with `otel_ml.integrations.torchelastic`",
    (LABEL_ROLE, LABEL_STATE),
)
#: The series only the integrations emit (a plain ``init()`` + ``log()`` run has none of them).
INTEGRATION_METRICS: tuple[MetricSpec, ...] = (
    SCALAR,
    SCALAR_NONFINITE,
    ELASTIC_OPERATIONS,
    ELASTIC_OPERATION_DURATION,
    ELASTIC_REMAINING_RESTARTS,
    ELASTIC_WORKER_STATE,
)
#: Template for any other scalar passed to log(): ``kl=`` becomes ``otel_ml_kl``.
USER_GAUGE_UNIT = "1"
#: Scalars that are not built in but that the shipped dashboards, rules and runbook read by
#: name: ``kl`` (watched by the KL-spike detector) and ``reward`` (RL runs). Each is exposed as
#: ``PREFIX + key`` when a run logs it.
WELL_KNOWN_KEYS: tuple[str, ...] = ("kl", "reward")

METRICS: tuple[MetricSpec, ...] = (
    STEP,
    LAST_STEP_TIMESTAMP,
    HEARTBEAT_TIMESTAMP,
    LOSS,
    LEARNING_RATE,
    GRAD_NORM,
    SAMPLES_PER_SECOND,
    TOKENS_PER_SECOND,
    SAMPLES,
    TOKENS,
    STEP_DURATION,
    GPU_MEMORY_ALLOCATED,
    GPU_MEMORY_RESERVED,
    GPU_MEMORY_PEAK,
    GPU_MEMORY_TOTAL,
    GPU_INFO,
    PROCESS_RESIDENT_MEMORY,
    NONFINITE,
    EXPORT_ERRORS,
    EXPORT_DROPPED,
    SPAN_DURATION,
    SPAN_SELF,
    SPAN_HOST,
    TRACED_STEPS,
    PROGRESS_COMPLETED,
    PROGRESS_TOTAL,
    PROGRESS_RATE,
    PROGRESS_ETA,
    PROGRESS_ELAPSED,
    PROGRESS_ACTIVE,
    ANOMALY_ACTIVE,
    ANOMALIES,
    DISTRIBUTION,
    *DISTRIBUTION_GAUGES,
    *INTEGRATION_METRICS,
)

#: Every Prometheus name otel_ml owns; a user key that would collide is renamed.
RESERVED_NAMES: frozenset[str] = (
    frozenset(n for m in METRICS for n in (m.name, m.prometheus_name))
    # A histogram also exposes these sample names: a user gauge called so would duplicate them.
    | frozenset(
        m.name + part for m in METRICS if m.kind == "histogram" for part in ("_bucket", "_count", "_sum")
    )
    | frozenset({"otel_ml_info"})
)

#: Default histogram bucket bounds for step durations, in seconds (1 ms to 10 min).
STEP_DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip


#: Bucket bounds for region durations, in seconds (50 µs to 10 s).
SPAN_DURATION_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip


def markdown_table() -> str:
    """The metric table for README.md, generated from :data:`METRICS`."""
    rows = ["| Prometheus name | kind | labels | source | meaning |", "|---|---|---|---|---|"]
    base = f"`{LABEL_RANK}`, `{LABEL_RUN_ID}`"
    for m in METRICS:
        labels = ", ".join([base, *(f"`{label}`" for label in m.labels)])
        rows.append(f"| `{m.prometheus_name}` | {m.kind} | {labels} | {m.source} | {m.description} |")
    rows.append(
        f"| `otel_ml_<key>` | gauge | {base} | any other scalar kwarg of log() | "
        "Last finite value; key sanitized (`kl=` -> `otel_ml_kl`). |"
    )
    return "\n".join(rows)
