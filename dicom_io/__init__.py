"""DICOM in and out: listener adapters, spool, series geometry, volumes, selection, writers."""
