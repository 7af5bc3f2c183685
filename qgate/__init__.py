"""qgate: a DICOM quality gate for CT."""

__version__ = "0.1.0"
