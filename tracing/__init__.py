"""OpenTelemetry traces of metered calls: recorded on the request path, built and sent over OTLP
in the background (see `recorder.Tracer` and `exporter.Exporter`)."""
