"""Offline miniature of the RoMA experiment.

``roma_peft.benchmark.suite``    -- the seeded multi-skill multiple-choice suite (eight attribute skills over shared
                                    creatures, with a jargon shift held out for post-training and test).
``roma_peft.benchmark.pretrain`` -- tokenizer training and from-scratch pretraining of the OLMoE of a world
                                    (``python -m roma_peft.benchmark.pretrain --out DIR --seed 0``), and the world cache.
``roma_peft.benchmark.variants`` -- the benchmark's training configurations and the dev-selected record for the demo.
``roma_peft.benchmark.runner``   -- the protocol (premises, selection on dev, seeds, controls, baselines, oracle).
``roma_peft.benchmark.demo``     -- ``roma-peft demo``. Imports run one way: demo -> runner -> variants.

World 0's pretrained checkpoint ships under ``assets/roma-mini-olmoe`` (``suite.shipped_model_path()``); it is also the
tiny model of the pipeline smoke tests (the ``tiny-offline`` recipe, the lm-eval harness tests).
"""
