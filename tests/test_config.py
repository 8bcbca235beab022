"""Configuration precedence (kwargs > env > default) and bad values (warning + default)."""

from __future__ import annotations

import logging

import pytest

from otel_ml.config import Config, markdown_table


def test_defaults_without_env():
    cfg = Config.resolve(env={})
    assert cfg.enabled and cfg.prometheus
    assert (cfg.prometheus_host, cfg.prometheus_port) == ("localhost", 9464)
    assert cfg.run_dir == "otel-ml-runs/{run_id}"
    assert cfg.otlp_protocol == "http/protobuf"
    assert cfg.metric_export_interval == 15.0
    assert not cfg.otlp_enabled and cfg.files_enabled


def test_env_overrides_defaults_and_kwargs_override_env():
    env = {
        "OTEL_SERVICE_NAME": "from-env",
        "OTEL_EXPORTER_PROMETHEUS_PORT": "9600",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "0.0.0.0",
        "OTEL_ML_RUN_DIR": "/data/{run_id}",
    }
    cfg = Config.resolve(env=env, service_name="from-kwarg")
    assert cfg.service_name == "from-kwarg"
    assert cfg.prometheus_port == 9600
    assert cfg.prometheus_host == "0.0.0.0"
    assert cfg.run_dir == "/data/{run_id}"


def test_millisecond_variables_become_seconds():
    env = {
        "OTEL_METRIC_EXPORT_INTERVAL": "2500",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "3000",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    cfg = Config.resolve(env=env)
    assert (cfg.metric_export_interval, cfg.otlp_timeout, cfg.span_export_delay) == (2.5, 3.0, 0.1)


@pytest.mark.parametrize(
    ("var", "raw", "field", "default"),
    [
        ("OTEL_EXPORTER_PROMETHEUS_PORT", "abc", "prometheus_port", 9464),
        ("OTEL_EXPORTER_PROMETHEUS_PORT", "70000", "prometheus_port", 9464),
        ("OTEL_METRIC_EXPORT_INTERVAL", "-5", "metric_export_interval", 15.0),
        ("OTEL_METRIC_EXPORT_INTERVAL", "nan", "metric_export_interval", 15.0),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon", "otlp_protocol", "http/protobuf"),
        ("OTEL_SDK_DISABLED", "maybe", "enabled", True),
        ("OTEL_ML_FILES", "sometimes", "files", "auto"),
        ("OTEL_ML_THROUGHPUT_WINDOW", "1", "throughput_window", 20),
    ],
)
def test_bad_env_value_warns_once_and_uses_default(caplog, var, raw, field, default):
    caplog.set_level(logging.WARNING, logger="otel_ml")
    cfg = Config.resolve(env={var: raw})
    assert getattr(cfg, field) == default
    warnings = [r.getMessage() for r in caplog.records if var in r.getMessage()]
    assert len(warnings) == 1
    Config.resolve(env={var: raw})
    assert len([r for r in caplog.records if var in r.getMessage()]) == 1


def test_sdk_disabled_turns_everything_off():
    assert not Config.resolve(env={"OTEL_SDK_DISABLED": "true"}).enabled
    assert Config.resolve(env={"OTEL_SDK_DISABLED": "false"}).enabled


def test_headers_are_parsed_and_url_decoded():
    cfg = Config.resolve(env={"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20tok,x-team=ml"})
    assert cfg.otlp_headers == {"authorization": "Bearer tok", "x-team": "ml"}


def test_malformed_headers_warning_never_shows_the_secret(caplog):
    cfg = Config.resolve(env={"OTEL_EXPORTER_OTLP_HEADERS": "api-key=ok,s3cr3t-token-no-equals"})
    assert cfg.otlp_headers == {}
    assert "OTEL_EXPORTER_OTLP_HEADERS" in caplog.text
    assert "s3cr3t" not in caplog.text
    assert "s3cr3t" not in repr(cfg)


def test_headers_are_hidden_from_repr():
    cfg = Config.resolve(env={}, otlp_headers={"authorization": "Bearer hunter2"})
    assert "hunter2" not in repr(cfg)


def test_otlp_endpoint_turns_files_off_in_auto_mode():
    cfg = Config.resolve(env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert cfg.otlp_enabled and not cfg.files_enabled
    assert Config.resolve(
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_ML_FILES": "on"}
    ).files_enabled
    assert not Config.resolve(env={"OTEL_ML_FILES": "off"}).files_enabled


def test_resource_attributes_from_env():
    cfg = Config.resolve(env={"OTEL_RESOURCE_ATTRIBUTES": "team=ml,cluster=a%2Cb"})
    assert cfg.resource_attributes == {"team": "ml", "cluster": "a,b"}


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="prometheus_prot"):
        Config.resolve(env={}, prometheus_prot=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prometheus_port": 70000},
        {"otlp_protocol": "udp"},
        {"metric_export_interval": 0},
        {"shutdown_timeout": float("inf")},
        {"files": "maybe"},
        {"trace_every": -1},
    ],
)
def test_bad_keyword_value_is_a_clear_error(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Config.resolve(env={}, **kwargs)


def test_every_option_is_documented_in_the_readme(readme_text):
    assert markdown_table() in readme_text
