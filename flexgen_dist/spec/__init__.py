"""A checkpoint's description from its folder (pure Python, no torch): ModelSpec from config.json
(model.py, each family's own fields in families.py, checked reads in checks.py), the defaults of
generation_config.json (generation.py), and which tensors make up each schedule layer (layout.py)."""
