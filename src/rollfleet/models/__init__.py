"""Models: the builtin tiny Llama with its character tokenizer, loading of HF model folders,
and the warm-up SFT stage. Everything here is saved in the usual Hugging Face layout
(config.json, model.safetensors, tokenizer.json) so any engine that loads such folders
can serve it."""
