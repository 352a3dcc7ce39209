"""moe-launch: plan, check, render and submit DeepSeek-V3-family MoE training jobs (submit side, torch-free)."""

__version__ = "0.1.0"
