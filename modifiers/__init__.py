"""Modifiers: one small file per modifier, a Pydantic model of its settings plus lifecycle hooks.

They depend on ``compressor`` and are found through the registry (entry points), never imported
by ``compressor`` itself.
"""
