"""tiblocal: extended-vocabulary Llama models from training to an offline laptop.

The core (this package) is what a laptop needs and imports no torch: the CLI, errors, text handling,
chat templates, GGUF conventions and the llama.cpp engine. The stages live in their own top-level
folders and install as ``tiblocal.convert`` (``convert/``), and later ``tiblocal.quantize`` and
``tiblocal.finetune``; the core never imports a stage.
"""

__version__ = "0.1.0"
