"""Other tools' formats: insightface arcface_torch run directories and config files, ONNX export and import."""
