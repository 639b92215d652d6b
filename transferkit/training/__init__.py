"""Training: phase plans, fine-tuning, distribution, the learning-rate finder and the run orchestrator."""
