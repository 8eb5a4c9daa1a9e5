"""Models: the prompted ViT (shallow VPT) and the backbone factory."""
from pfedpg.models.backbone import ModelConfig, backbone_num_params, build_backbone, vpt_init_bound
from pfedpg.models.prompted_vit import PromptedViT, PromptTokens

__all__ = [
    "ModelConfig",
    "PromptTokens",
    "PromptedViT",
    "backbone_num_params",
    "build_backbone",
    "vpt_init_bound",
]
