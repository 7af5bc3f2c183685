"""Helpers shared by tests and benchmarks: real DICOM peers started on loopback."""
