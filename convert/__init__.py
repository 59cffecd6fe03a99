"""Conversion stage (installed as ``tiblocal.convert``): Hugging Face models to GGUF."""
