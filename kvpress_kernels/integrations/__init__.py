"""Drop-in integrations: Hugging Face transformers (:mod:`.transformers`) and NVIDIA kvpress
(:mod:`.kvpress`, optional dependency). Import the submodule you need; neither is imported here, so
``import kvpress_kernels`` stays free of both libraries."""
