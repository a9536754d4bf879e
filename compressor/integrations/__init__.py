"""Integrations of compressor's recipes with other training frameworks.

Nothing here is imported by ``import compressor``; import the integration you use:

    compressor.integrations.hf    ``CompressionCallback``, a ``transformers.TrainerCallback`` that runs a
                                  recipe's modifiers inside ``Trainer.train()`` (needs the ``hf`` extra)
"""
