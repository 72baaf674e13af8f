"""Evaluate a SUPERB-style downstream checkpoint: greedy CTC decoding, PER or WER, layer weights.

    mtssl-superb-eval RUN/checkpoints/checkpoint_best.pt --split test [--json result.json] [--batch-size 1]

For ``.phn`` transcripts the error rate is over phones (PER); for ``.ltr`` (letters with ``|`` word
boundaries) over words (WER) and letters (CER). No language model.

Utterances are decoded one at a time by default, as s3prl 0.4.18 does for dev and test
(``downstream/ctc/data.py`` ``EVAL_BATCH_SIZE = 1``; ``downstream/asr/config.yaml`` ``eval_batch_size: 1``):
a group-normalised front end (HuBERT / wav2vec 2.0 Base, ``extractor_mode: default``) normalises over
the whole padded input, so in a padded batch an utterance's features depend on its neighbours.
``--batch-size N`` pads N utterances together (faster; exact for layer-normalised front ends only).
"""

import argparse
from typing import Dict, Iterator, List, Sequence, Tuple

import editdistance
import torch

from ..atomic import report_result
from ..errors import cli


def ctc_greedy(lprobs: torch.Tensor, blank: int) -> List[int]:
    """Best path of ``lprobs (T, V)``: argmax per frame, repeats merged, blanks dropped."""
    best = lprobs.argmax(-1).unique_consecutive()
    return best[best != blank].tolist()


def error_rate(hyps: Sequence[Sequence], refs: Sequence[Sequence]) -> float:
    """Summed edit distance over summed reference length, in %."""
    errors = sum(editdistance.eval(list(h), list(r)) for h, r in zip(hyps, refs))
    return 100.0 * errors / max(1, sum(len(r) for r in refs))


def letters_to_words(symbols: Sequence[str]) -> List[str]:
    return "".join(symbols).replace("|", " ").split()


def utterance_log_probs(model, task, split: str, batch_size: int = 1) -> Iterator[Tuple[int, torch.Tensor, List[int]]]:
    """``(id, log-probabilities (T, V) of the utterance's own frames, reference label ids)`` for each
    utterance of ``split``, in dataset order, run ``batch_size`` at a time (padded to the batch's longest)."""
    task.load_dataset(split)
    dataset = task.dataset(split)
    dictionary = task.target_dictionary
    batches = task.get_batch_iterator(
        dataset,
        max_tokens=None,
        max_sentences=batch_size,
        ignore_invalid_inputs=False,
        required_batch_size_multiple=1,
    ).next_epoch_itr(shuffle=False)
    with torch.no_grad():
        for sample in batches:
            out = model(**sample["net_input"])
            lprobs = model.get_normalized_probs(out, log_probs=True).transpose(0, 1)
            mask = out["padding_mask"]
            lengths = (~mask).sum(1) if mask is not None else torch.full((lprobs.size(0),), lprobs.size(1))
            for i, lp, n, target in zip(sample["id"].tolist(), lprobs, lengths, sample["target"]):
                keep = (target != dictionary.pad()) & (target != dictionary.eos())
                yield i, lp[:n], target[keep].tolist()


def evaluate_model(model, task, split: str, batch_size: int = 1) -> Dict:
    """Greedy CTC decoding of ``split`` and its error rates (see the module's docstring)."""
    dictionary = task.target_dictionary
    blank = dictionary.index(task.blank_symbol)
    hyps, refs = [], []
    for _, lp, target in sorted(utterance_log_probs(model, task, split, batch_size), key=lambda u: u[0]):
        hyps.append([dictionary[i] for i in ctc_greedy(lp, blank)])
        refs.append([dictionary[i] for i in target])
    result = {
        "split": split,
        "utterances": len(refs),
        "batch_size": batch_size,
        "labels": task.cfg.labels,
        "layer_weights": [round(w, 4) for w in model.layer_weights()],
    }
    if task.cfg.labels == "ltr":
        result["wer"] = round(error_rate([letters_to_words(h) for h in hyps], [letters_to_words(r) for r in refs]), 2)
        result["cer"] = round(
            error_rate([[c for c in h if c != "|"] for h in hyps], [[c for c in r if c != "|"] for r in refs]), 2
        )
    else:
        result["per"] = round(error_rate(hyps, refs), 2)
    return result


def evaluate(checkpoint: str, split: str, batch_size: int = 1) -> Dict:
    from ..upstream import load_model_and_task

    model, cfg, task = load_model_and_task(checkpoint)
    return {"checkpoint": checkpoint, **evaluate_model(model, task, split, batch_size)}


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--json")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="utterances per forward (default 1, s3prl's eval batch size: no padding, exact for any front end)",
    )
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error("--batch-size must be at least 1")
    result = evaluate(a.checkpoint, a.split, a.batch_size)
    report_result(result, a.json)


if __name__ == "__main__":
    main()
