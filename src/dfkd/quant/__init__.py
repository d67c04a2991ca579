"""Quantization: integer models through torchao's PT2E flow (pt2e), their calibration inputs
without data (calibration), and quantization-aware fine-tuning by the float model (qat)."""

from dfkd.quant.pt2e import load_quantized

__all__ = ["load_quantized"]
