"""lorafit: LoRA fine-tuning of encoder models on GLUE.

Reproduces "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., ICLR 2022) for
BERT, RoBERTa and DeBERTa-v2 encoders: a frozen pretrained model gets trainable low-rank
matrices on chosen projections, h = W0 x + (alpha / r) B A x.
"""

__version__ = "0.1.0"
