"""HL7 v2 ingest, report text, snippet mining and the export manifest."""
