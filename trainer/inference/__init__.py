"""Using a trained model: the one inference path (``Predictor``), decoding detections, the
``predict`` command and its overlays, and the ONNX export."""
