"""Thin HTTP routes; the work happens in `service.serving`."""
