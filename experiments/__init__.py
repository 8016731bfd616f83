"""What one variant does: one module per training method (`sft`, `lora_sft`, `partial_ft`, `dpo_lora`,
each exposing `train(ctx) -> dict`), model loading (`models`), data (`data`) and shared helpers (`common`).
The method name in a grid's `method:` is the module name."""
