"""Where a station's events go: sinks, registered by name (``mqtt``, ``webhook``, …), each fed from the outbox.

A sink walks the outbox records it has not settled, oldest first, on its own thread, and settles each when its
receiver has it (a PUBACK, an HTTP 2xx) or has refused it for good; the outbox deletes a record once every sink
named in the config's ``sinks`` list has settled it (edge/outbox.py). So a sink's outage never loses another's
records and never holds them up, and a restart sends what each sink had not delivered, first.

Adding a sink = one module in ``edge/sinks/`` with a factory decorated ``@register_sink("<name>")`` (and its
test); the package is scanned on first lookup, so there is no list to edit. Its settings go in a section of
edge/config.py (documented in config/station.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol

from core.errors import UserError
from core.plugins import import_all_modules
from edge.config import StationConfig
from edge.outbox import Outbox

CommandHandler = Callable[[bytes], None]


class Sink(Protocol):
    """One output of the station."""

    name: str
    flush_timeout_s: float  # how long a stopping station waits for this sink to deliver what it holds

    def start(self) -> None:
        """Start delivering in the background; an unreachable receiver is retried, never fatal."""
        ...

    def stop(self, timeout: float = 2.0) -> None:
        """Stop delivering (what is undelivered stays in the outbox for the next run)."""
        ...

    def wake(self) -> None:
        """Something new is in the outbox."""
        ...

    def wait_first_attempt(self, timeout: float) -> bool:
        """Wait (bounded) until the first connection or delivery attempt has an outcome; True when it reached
        its receiver (so that, e.g., MQTT's ``online`` normally precedes the first event)."""
        ...

    def flush(self, timeout: float) -> int:
        """Wait (bounded) until this sink has settled everything; returns how many records it has not."""
        ...

    @property
    def pending(self) -> int:
        """Records this sink has not settled yet."""
        ...

    @property
    def connected(self) -> bool:
        """The receiver was reachable at the last attempt."""
        ...

    def stats(self) -> dict[str, Any]:
        """``depth``, ``delivered``, ``failed`` and ``connected`` (core/schemas/stats.schema.json, ``sinks``)."""
        ...

    def publish_stats(self, payload: bytes) -> None:
        """The station's stats JSON (a sink that carries no stats ignores it)."""
        ...

    def publish_health(self, payload: bytes) -> None:
        """The station's health JSON (a sink that carries no health ignores it)."""
        ...

    def describe(self) -> str:
        """What the start-up line says about it (never a secret)."""
        ...

    def failure(self) -> Optional[str]:
        """None while the sink works (an unreachable receiver included: that is retried); a one-line cause when
        a worker thread of the sink has died, so the station can say so and exit for systemd to restart it."""
        ...


@dataclass
class SinkContext:
    """What a sink is built from: the station's config, its outbox and the commands its operators may send."""

    cfg: StationConfig
    outbox: Outbox
    commands: Mapping[str, CommandHandler] = field(default_factory=dict)


SinkFactory = Callable[[SinkContext], Sink]
SettingsCheck = Callable[[StationConfig], None]
_SINKS: dict[str, SinkFactory] = {}
_CHECKS: dict[str, SettingsCheck] = {}


def register_sink(name: str, check: Optional[SettingsCheck] = None) -> Callable[[SinkFactory], SinkFactory]:
    """Decorator: make a sink factory known by ``name`` (what the config's ``sinks`` list calls it). ``check``:
    a cheap look at the sink's settings (a URL) that raises a one-line UserError, run before anything heavy."""

    def deco(factory: SinkFactory) -> SinkFactory:
        known = _SINKS.get(name)
        if known is not None and known.__qualname__ != factory.__qualname__:
            raise ValueError(f"sink {name!r} is registered twice ({known.__qualname__}, {factory.__qualname__})")
        _SINKS[name] = factory
        if check is not None:
            _CHECKS[name] = check
        return factory

    return deco


def _discover() -> None:
    import_all_modules(__name__)


def sink_names() -> list[str]:
    """The registered sinks' names, sorted."""
    _discover()
    return sorted(_SINKS)


def check_sink_settings(cfg: StationConfig) -> None:
    """The cheap checks of every sink ``cfg.sinks`` names (a bad URL fails before a bundle is loaded)."""
    _discover()
    for name in cfg.sinks:
        check = _CHECKS.get(name)
        if check is not None:
            check(cfg)


def create_sinks(ctx: SinkContext) -> list[Sink]:
    """The sinks ``ctx.cfg.sinks`` names, in its order; an unknown name is a one-line UserError."""
    names = sink_names()
    for name in ctx.cfg.sinks:
        if name not in _SINKS:
            raise UserError(f"sinks: unknown sink {name!r}; choose from {', '.join(names)}")
    return [_SINKS[name](ctx) for name in ctx.cfg.sinks]
