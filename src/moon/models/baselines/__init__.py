"""Baselines scored by the same harness as MOON; loaded through :func:`moon.load_embedder`.

==================== =================================================== ==========
family               what                                                trainable
==================== =================================================== ==========
``random``           content-blind unit vectors: the chance floor        no
``dual-encoder``     CLIP-style ViT + byte-level text transformer        yes (all)
``pretrained-towers`` frozen EfficientNet-Lite0 + MiniLM, trained heads   yes (heads)
``two-tower``        CLIP-style, from a MOON graft preset's pretrained    yes (LM + image head)
                     parts (image encoder + the same causal LM)
``open-clip``        open_clip / SigLIP checkpoints users have           no
``gme``              GME-Qwen2-VL checkpoints users have                 no
==================== =================================================== ==========

``moon.load_embedder("dual-encoder")`` gives a fresh seeded model, ``moon.load_embedder("dual-encoder:DIR")``
(or ``moon.load_embedder(DIR)``) a saved one; ``overrides={...}`` change config fields and
``trainable=True`` asks for a model ``moon train`` can train. The families and their loaders are
listed once, in :mod:`moon.models.registry`.
"""
