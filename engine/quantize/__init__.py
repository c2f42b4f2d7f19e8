"""INT8 quantization: calibration, qparams, QDQ import/export, accuracy tools."""
