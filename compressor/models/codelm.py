"""``codelm``: a small GPT-2 decoder for code, built from a config (nothing is downloaded).

``transformers.GPT2LMHeadModel`` (the ``hf`` extra) with GPT-2's own causal self-attention, learned
positions, pre-LayerNorm blocks and the output layer tied to the token embedding (one tensor,
``transformer.wte.weight``, also reached as ``lm_head.weight``). Given ``labels`` it returns its own
``loss``, the mean cross entropy of predicting each token from the ones before it (labels shifted
by one inside the model; -100 not scored), so the ``model-loss`` task trains it as it is.

Sized for the ``code_text`` data on a CPU: width 192, 4 layers of 4 heads (48 wide), feed-forward
768, no dropout (a run of about one epoch does not overfit); 1.85M parameters with 258 byte tokens
and 128 positions, which a 15-minute run on 2 CPU cores trains well past the untrained model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from compressor.core.factories import ZooError

#: The GPT2Config settings of ``codelm`` besides the vocabulary and positions (from the data).
CODELM: dict[str, Any] = {
    "n_embd": 192,
    "n_layer": 4,
    "n_head": 4,
    "n_inner": 768,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
#: Above this, a ``codelm`` does not train on a CPU in the time its recipe has.
MAX_PARAMETERS = 20_000_000


def gpt2_lm(vocab_size: int, n_positions: int, **settings: Any) -> nn.Module:
    """A freshly initialized ``GPT2LMHeadModel`` (tied embeddings) from ``GPT2Config`` settings.

    The last token id (``vocab_size - 1``) is the config's pad id and the one before it bos and eos
    (``compressor.data.code_text``: EOS 256, PAD 257 of 258). Initialized from the global torch RNG
    (``build_model`` seeds it). ZooError without transformers or for sizes that do not fit.
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:
        raise ZooError(
            "the codelm model needs transformers, which is not installed: pip install compressor[hf]"
        ) from err
    if vocab_size < 3 or n_positions < 2:
        raise ZooError(
            f"codelm needs token data: a vocabulary of at least 3 (num_classes) and blocks of at "
            f"least 2 positions (input_shape), got num_classes {vocab_size}, input_shape ({n_positions},); "
            "train it on code_text"
        )
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 2,
        pad_token_id=vocab_size - 1,
        tie_word_embeddings=True,
        **settings,
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # what transformers falls back to, with a warning, for GPT2LMHeadModel
    return model


def build_codelm(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``codelm`` for data of blocks ``input_shape`` = (block_size,) over ``num_classes`` tokens."""
    if len(input_shape) != 1:
        raise ZooError(
            f"codelm takes blocks of token ids, input_shape (block_size,), got {tuple(input_shape)}; "
            "train it on code_text"
        )
    return gpt2_lm(num_classes, int(input_shape[0]), **CODELM)
