"""Pipelines: commands that chain the stages (convert, quantize, imatrix, GPTQ, evaluation) into one result.

The core (``tiblocal/``) never imports a stage; the stages import the core; a pipeline imports both. ``release`` makes
a model's publishable folder; the bundled demo model's recipe (``benchmarks/device/train_demo.sh``, then ``release``)
is documented in docs/bundled-model.md.
"""
