"""Training and fine-tuning: data, losses, LoRA, and the training loop."""
