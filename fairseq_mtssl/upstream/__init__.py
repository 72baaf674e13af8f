"""A fairseq speech model as a frozen feature extractor: the one home of that knowledge.

- :mod:`.checkpoint`: read any supported checkpoint safely (fairseq HuBERT, wav2vec 2.0, data2vec,
  and the plugin's MT4SSL, SCORE and VGS+SSL) and find the speech encoder inside it.
- :mod:`.frontend`: the conv front end's geometry (frames per utterance, frame rate), whether it can be
  batched, and padded batches with the sample masks from which the model derives the right frames.
- :mod:`.layers`: hidden states of every transformer layer, captured with forward hooks.

Used by k-means features, SCORE, retrieval, SUPERB, ABX, QbE, the phone probe and conversion.
"""

from .checkpoint import load_model_and_task, load_speech_model, load_upstream, read_checkpoint, speech_encoder_of
from .frontend import (
    batch_waveforms,
    bucket_length,
    conv_layers_of,
    conv_output_frames,
    frame_rate_of,
    front_end_batchable,
    group_norm_over_valid_frames,
    hubert_sample_padding_mask,
    sample_padding_mask,
)
from .layers import hidden_states, record_layers

__all__ = [
    "batch_waveforms",
    "bucket_length",
    "conv_layers_of",
    "conv_output_frames",
    "frame_rate_of",
    "front_end_batchable",
    "group_norm_over_valid_frames",
    "hidden_states",
    "hubert_sample_padding_mask",
    "load_model_and_task",
    "load_speech_model",
    "load_upstream",
    "read_checkpoint",
    "record_layers",
    "sample_padding_mask",
    "speech_encoder_of",
]
