"""Taking a trained run elsewhere: ``hf`` writes a Hugging Face ``transformers`` folder (GPT-2, Llama, Mistral)."""
