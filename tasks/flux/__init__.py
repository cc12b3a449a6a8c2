"""flux: FLUX.1-class flow-matching transformer pipelines loaded from disk through diffusers."""
