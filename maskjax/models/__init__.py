"""Flax NNX models: transformer layers and the Vision Transformer."""
from maskjax.models.layers import Attention, Block, Dense, LayerNorm, Mlp, Stack, gather_tokens
from maskjax.models.vit import ViTEncoder, encoder_from_config, patchify, sincos_pos_embed, token_grid, unpatchify
