"""Camera-station runtime: capture → batch → engine → events → MQTT. Never imports torch."""

__version__ = "0.1.0"
