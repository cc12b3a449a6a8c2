"""sdxl: Stable Diffusion XL-class pipelines loaded from disk through diffusers."""
