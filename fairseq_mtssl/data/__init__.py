"""Audio, manifest and label input/output with errors that name the file and line."""
