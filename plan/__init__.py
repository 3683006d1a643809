"""plan: LoRA fine-tuning when data arrives over time (continual learning) or stays with clients (federated)."""

from plan.lora import LoRAConfig, LoRALinear, export_peft, inject_lora, load_adapters, lora_layers, save_adapters

__version__ = "0.1.0"
__all__ = ["LoRAConfig", "LoRALinear", "export_peft", "inject_lora", "load_adapters", "lora_layers", "save_adapters"]
