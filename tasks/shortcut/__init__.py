"""Few-step students of any task's model, for shortcut-model (ShortFT, arXiv 2507.22604).

A student is the task's own guided denoiser with a frozen weight delta (student.py): the long
model's trainable leaves reach the student's samples, so a gradient through its K-step chain is a
gradient for the long model. It comes from a path in one of three forms (sources.py): the repo's
own distillation (distil.py, `python -m tasks.shortcut`), a diffusers-format LoRA made dense
(lora.py: LCM, TCD, Hyper-SD, PCM), or a distilled checkpoint of the same architecture. Whether it
follows the long chain is measured on each problem (check.py)."""

from tasks.shortcut.check import trajectory_error
from tasks.shortcut.student import Student, denoising_network, student_chain

__all__ = ["Student", "denoising_network", "student_chain", "trajectory_error"]
