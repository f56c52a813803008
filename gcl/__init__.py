"""gcl: Generalized Contrastive Learning for CLIP/SigLIP fine-tuning."""
__version__ = "0.1.0"
