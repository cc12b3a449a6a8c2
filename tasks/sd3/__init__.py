"""sd3: Stable Diffusion 3 / 3.5-class flow-matching transformer pipelines loaded from disk through diffusers."""
