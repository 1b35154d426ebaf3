"""Export of a fine-tuned (compressed) checkpoint: ``python -m src.export`` (``__main__``).

- ``__main__``: the command; rebuilds the checkpoint's model and writes the folder (tokenizer, model card, ``export.json``);
- ``exported``: Hugging Face folders (scales folded; a stock model or the recorded structure, ``load_exported``) and ONNX;
- ``to_gguf``: GGUF files that llama.cpp runs (Llama-family causal LMs).
"""
