"""sd: Stable Diffusion-class latent diffusion pipelines loaded from disk through diffusers."""
