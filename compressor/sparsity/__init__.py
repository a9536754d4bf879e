"""Unstructured and semi-structured sparsity: the scheduled-pruner base that pruning modifiers
extend (settings, update steps, mask selection) and mask structures (blocks, N:M).
"""
