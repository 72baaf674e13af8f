"""Manifest builders: wav/flac trees, LibriSpeech, SpokenCOCO-style captions, the embedded corpus."""
