"""Training, calibration, export and engine building. Depends on `edge` for the bundle format, never the reverse."""
