"""The error of model loading, apart from :mod:`postrl.models.loading` so that :mod:`postrl.models.lora` raises it
without importing the loader (which imports the LoRA module)."""


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what to do."""
