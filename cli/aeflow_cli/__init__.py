"""The ``aeflow-cli`` command-line application of monai-aeflow."""
