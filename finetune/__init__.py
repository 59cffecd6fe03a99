"""Training stage (installed as ``tiblocal.finetune``): vocabulary extension, pretraining, SFT."""
