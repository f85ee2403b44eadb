"""Native multimodal transformers: a joint-attention backbone with swappable blocks."""

from mot.blocks import BLOCKS, BlockConfig, DenseConfig, register_block
from mot.config import AttentionConfig, ModalitySpec, ModelConfig
from mot.model import Batch, MultimodalTransformer
from mot.mot import MoTConfig  # registers the "mot" block kind
from mot.sparse import MoEBlockConfig, MoMaConfig, MoTMoEConfig  # "moe", "moma", "mot_moe"

__all__ = ["AttentionConfig", "BLOCKS", "Batch", "BlockConfig", "DenseConfig", "ModalitySpec",
           "MoEBlockConfig", "MoMaConfig", "MoTConfig", "MoTMoEConfig", "ModelConfig",
           "MultimodalTransformer", "register_block"]
