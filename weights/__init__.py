"""The trained heads that ship with aqa (data only; see README.md in this folder).

In a wheel this folder is the package ``aqa_weights`` (pyproject.toml maps it), so the heads are installed with
the code and found through ``importlib.resources`` (``aqa_cli.heads.checkpoint.shipped_dir``).
"""
