"""The frozen Hugging Face model, and the seams through which the engine drives it."""
