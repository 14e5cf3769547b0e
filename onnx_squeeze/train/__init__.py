"""The torch side of onnx_squeeze: reference models, export and weight helpers; nothing in the minimizer imports it."""
