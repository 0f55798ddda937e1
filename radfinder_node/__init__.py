"""radfinder-node: the application that wires DICOM, the model and HL7 to a database."""

__version__ = "0.1.0"
