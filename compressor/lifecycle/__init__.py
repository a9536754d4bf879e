"""The lifecycle of a recipe's modifiers around any PyTorch training loop: ``Session`` and the
mini-batch gradient sampler of second-order modifiers.
"""
