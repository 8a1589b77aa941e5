"""models stage: pull base models from the Hugging Face hub into the bucket."""
