"""Quantization stage (installed as ``tiblocal.quantize``): GGUF k-quants through llama.cpp's own quantizer."""
