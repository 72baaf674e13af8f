"""Evaluate a SUPERB-style downstream checkpoint: greedy CTC decoding, PER or WER, layer weights.

    mtssl-superb-eval RUN/checkpoints/checkpoint_best.pt --split test [--json result.json]

For ``.phn`` transcripts the error rate is over phones (PER); for ``.ltr`` (letters with ``|`` word
boundaries) over words (WER) and letters (CER). No language model.
"""

import argparse
from typing import Dict, List, Sequence

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


def evaluate(checkpoint: str, split: str, max_tokens: int = 1_600_000) -> Dict:
    from ..upstream import load_model_and_task

    model, cfg, task = load_model_and_task(checkpoint)
    task.load_dataset(split)
    dataset = task.dataset(split)
    dictionary = task.target_dictionary
    blank = dictionary.index(task.blank_symbol)
    batches = task.get_batch_iterator(
        dataset, max_tokens=max_tokens, max_sentences=8, ignore_invalid_inputs=False, required_batch_size_multiple=1
    ).next_epoch_itr(shuffle=False)
    hyps, refs = [], []
    with torch.no_grad():
        for sample in batches:
            out = model(**sample["net_input"])
            lprobs = model.get_normalized_probs(out, log_probs=True).transpose(0, 1)
            mask = out["padding_mask"]
            lengths = (~mask).sum(1) if mask is not None else torch.full((lprobs.size(0),), lprobs.size(1))
            for lp, n, target in zip(lprobs, lengths, sample["target"]):
                keep = (target != dictionary.pad()) & (target != dictionary.eos())
                hyps.append([dictionary[i] for i in ctc_greedy(lp[:n], blank)])
                refs.append([dictionary[i] for i in target[keep].tolist()])
    result = {
        "checkpoint": checkpoint,
        "split": split,
        "utterances": len(refs),
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


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--json")
    a = p.parse_args(argv)
    result = evaluate(a.checkpoint, a.split)
    report_result(result, a.json)


if __name__ == "__main__":
    main()
