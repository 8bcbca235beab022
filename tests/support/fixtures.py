"""Pytest fixtures around :mod:`tests.support.otlp_receiver`.

``tests/conftest.py`` imports them, so every test under ``tests/`` can simply ask for them::

    def test_x(otlp_receiver): ...

Every server is registered for stopping with ``request.addfinalizer`` before it starts, so it is
stopped even if its start or the test fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.otlp_receiver import OtlpReceiver, closed_port


@pytest.fixture
def otlp_receiver_factory(request: pytest.FixtureRequest) -> Callable[..., OtlpReceiver]:
    """Start receivers with options (``grpc=``, ``http=``, ``mode=``); all are stopped after the test."""

    def start(**options: object) -> OtlpReceiver:
        receiver = OtlpReceiver(**options)  # type: ignore[arg-type]
        request.addfinalizer(receiver.stop)
        return receiver.start()

    return start


@pytest.fixture
def otlp_receiver(otlp_receiver_factory: Callable[..., OtlpReceiver]) -> OtlpReceiver:
    """A running receiver serving both gRPC and OTLP/HTTP on 127.0.0.1, mode ``ok``."""
    return otlp_receiver_factory()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A reserved 127.0.0.1 port that refuses connections: a collector that is down."""
    with closed_port() as port:
        yield port
