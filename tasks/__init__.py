"""Standardized tasks: a model, sampler settings, rewards, targets and evaluation metrics.
BUILT_IN maps each task's name to its class: adding a task is a module (or folder) here and a
line below."""

BUILT_IN = {
    "toy": "tasks.toy:Toy",
    "digits": "tasks.digits.task:Digits",
    "sd": "tasks.sd.task:StableDiffusion",
    "sdxl": "tasks.sdxl.task:StableDiffusionXL",
    "sd3": "tasks.sd3.task:StableDiffusion3",
    "flux": "tasks.flux.task:Flux",
}
