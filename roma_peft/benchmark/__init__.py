"""Offline miniature of the RoMA experiment.

``roma_peft.benchmark.suite``    -- the seeded multi-skill multiple-choice task suite (with a held-out shift).
``roma_peft.benchmark.pretrain`` -- tokenizer training and from-scratch pretraining of the tiny OLMoE
                                    (``python -m roma_peft.benchmark.pretrain --out DIR --seed 0``).

The pretrained checkpoint ships under ``assets/roma-mini-olmoe`` (see ``suite.shipped_model_path()``).
"""
