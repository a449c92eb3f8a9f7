"""Commands that write params.yaml: `camid profile` and `camid catalog from-folder`."""
