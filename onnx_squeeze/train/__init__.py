"""The torch side of onnx_squeeze: reference models, export and weight helpers. Nothing in the minimizer imports it."""
