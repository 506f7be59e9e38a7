"""int8 quantization (issue 5). So far: streaming calibration statistics and range
selection (calibration.py); the QDQ pass itself is not written yet and not registered."""
