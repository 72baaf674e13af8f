"""The embedded corpus: spoken captions of rendered scenes, synthesised with espeak-ng, phone-aligned."""
