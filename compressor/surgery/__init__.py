"""Structural surgery: removing output channels, attention heads and FFN neurons physically, with
everything that depends on them, and rebinding an optimizer to the smaller parameters.
"""
