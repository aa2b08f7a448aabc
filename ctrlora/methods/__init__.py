"""PEFT methods, one module each, registered by name (`base.register_method`, `base.build_method`)."""
