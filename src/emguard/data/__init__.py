"""Data: chat format, masking, built-in sets, generators and loaders."""
