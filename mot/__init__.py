"""Native multimodal transformers: a joint-attention backbone with swappable blocks."""

from mot.blocks import BLOCKS, BlockConfig, DenseConfig, register_block
from mot.config import AttentionConfig, ModalitySpec, ModelConfig
from mot.model import Batch, MultimodalTransformer

__all__ = ["AttentionConfig", "BLOCKS", "Batch", "BlockConfig", "DenseConfig", "ModalitySpec",
           "ModelConfig", "MultimodalTransformer", "register_block"]
