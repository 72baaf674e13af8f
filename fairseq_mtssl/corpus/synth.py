"""Build the embedded corpus: spoken captions of rendered scenes, many voices, phone-aligned.

    mtssl-synth-corpus --out data/corpus [--hours 0.5] [--seed 1]

Layout of ``--out`` (written under a temporary name, moved into place when complete):

    corpus.json                   parameters, speakers, phone inventory, utterance counts
    images/{image_id}.png         rendered scenes (RGB, --image-size pixels square)
    scenes.jsonl                  one scene a line: {"image": id, "objects": [...]}
    wav/{split}/{speaker}/{utt}.wav   16 kHz mono PCM16
    captions/{split}.json         SpokenCOCO-style: {"data": [{"image", "captions": [{"wav", "text", "speaker", "uttid"}]}]}
    alignments/{split}.phones.ctm phone alignment ("utt start end phone", see corpus/alignment.py)
    alignments/{split}.words.ctm  word alignment
    lexicon.txt                   word, then its most frequent phone sequence

Splits: ``train`` and ``valid`` share the training speakers (disjoint images); ``test`` uses
held-out speakers and held-out images. Everything is a function of ``--seed`` and the sizes.
"""

import argparse
import json
import logging
import multiprocessing
import sys
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly
from tqdm import tqdm

from ..atomic import atomic_directory
from ..errors import cli
from .alignment import SILENCE, align_events, format_ctm
from .espeak import EspeakSynthesizer, Voice
from .scenes import caption_templates, render_scene, sample_scene

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SAMPLE_RATE = 16000
TRAIN_VARIANTS = (
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "f1",
    "f2",
    "f3",
    "f4",
    "klatt",
    "klatt3",
    "iven",
    "john",
    "linda",
    "max",
)
TEST_VARIANTS = ("m7", "m8", "f5", "klatt2", "edward", "david")
MEAN_CAPTION_SECONDS = 2.7
SPLITS = ("train", "valid", "test")  # measured on the default voices, used to turn --hours into images


def make_speakers(rng: np.random.Generator, variants) -> List[Voice]:
    return [
        Voice(
            variant=v,
            rate=int(rng.integers(135, 200)),
            pitch=int(rng.integers(25, 76)),
            pitch_range=int(rng.integers(30, 81)),
        )
        for v in variants
    ]


def speaker_id(i: int, voice: Voice) -> str:
    return f"spk{i:02d}-{voice.variant}"


def _speakers(seed: int):
    rng = np.random.default_rng(seed)
    train, test = make_speakers(rng, TRAIN_VARIANTS), make_speakers(rng, TEST_VARIANTS)
    voices = {speaker_id(i, v): v for i, v in enumerate(train + test)}
    ids = {"train": list(voices)[: len(train)], "test": list(voices)[len(train) :]}
    ids["valid"] = ids["train"]
    return voices, ids


def synth_split(out: Path, split: str, n_images: int, seed: int, captions_per_image: int, image_size: int) -> dict:
    """Render and speak one split into ``out``. Runs in a fresh process: libespeak-ng keeps state
    between calls (even across espeak_Terminate), so output depends on what was spoken before."""
    voices, ids_by_split = _speakers(seed)
    speaker_ids = ids_by_split[split]
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    synth = EspeakSynthesizer()
    data, phone_lines, word_lines, scenes, prons = [], [], [], [], []
    phone_inventory: Counter = Counter()
    total = 0.0
    bar = tqdm(
        total=n_images * captions_per_image,
        desc=f"synth {split}",
        unit="utt",
        file=sys.stderr,
        disable=None,
        mininterval=2.0,
    )
    for k in range(n_images):
        scene = sample_scene(rng, f"{split}_{k:05d}")
        render_scene(scene, image_size).save(out / "images" / f"{scene.image_id}.png")
        scenes.append(json.dumps(scene.to_json()))
        templates = caption_templates(scene)
        wordings = rng.choice(len(templates), size=captions_per_image, replace=captions_per_image > len(templates))
        speakers = rng.choice(len(speaker_ids), size=captions_per_image, replace=False)
        captions = []
        for c, (w, v) in enumerate(zip(wordings, speakers)):
            spk, text = speaker_ids[v], templates[w]
            audio22, events = synth.synthesize(
                text, voices[spk], noise_seed=seed * 1_000_003 + SPLITS.index(split) * 100_003 + k * 11 + c
            )
            audio = np.clip(
                resample_poly(audio22.astype(np.float32) / 32768.0, SAMPLE_RATE, synth.sample_rate), -1.0, 1.0
            )
            phones, words = align_events(events, len(audio), text, synth.sample_rate, SAMPLE_RATE)
            utt = f"{spk}-{scene.image_id}-{c}"
            rel = f"wav/{split}/{spk}/{utt}.wav"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(out / rel, audio, SAMPLE_RATE, subtype="PCM_16")
            phone_lines += format_ctm(utt, phones)
            word_lines += format_ctm(utt, words)
            phone_inventory.update(p.label for p in phones)
            for word in words:
                if word.label != SILENCE:
                    inside = [p.label for p in phones if p.start >= word.start - 1e-9 and p.end <= word.end + 1e-9]
                    prons.append((word.label, " ".join(inside)))
            captions.append({"wav": rel, "text": text, "speaker": spk, "uttid": utt})
            total += len(audio) / SAMPLE_RATE
            bar.update(1)
        data.append({"image": f"images/{scene.image_id}.png", "captions": captions})
    bar.close()
    (out / "captions" / f"{split}.json").write_text(json.dumps({"data": data}, indent=1))
    (out / "alignments" / f"{split}.phones.ctm").write_text("\n".join(phone_lines) + "\n")
    (out / "alignments" / f"{split}.words.ctm").write_text("\n".join(word_lines) + "\n")
    return {
        "utterances": n_images * captions_per_image,
        "seconds": round(total, 2),
        "scenes": scenes,
        "phones": sorted(phone_inventory),
        "prons": prons,
    }


def build(out: Path, hours: float, seed: int, captions_per_image: int, image_size: int, workers: int = 2) -> dict:
    voices, ids_by_split = _speakers(seed)
    n_train = max(4, int(round(hours * 3600 / (MEAN_CAPTION_SECONDS * captions_per_image))))
    n_images = {"train": n_train, "valid": max(2, n_train // 10), "test": max(2, n_train // 5)}
    for sub in ("images", "captions", "alignments"):
        (out / sub).mkdir(parents=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {
            split: pool.submit(synth_split, out, split, n_images[split], seed, captions_per_image, image_size)
            for split in SPLITS
        }
        results = {split: fut.result() for split, fut in futures.items()}

    pron: Dict[str, Counter] = defaultdict(Counter)
    for split in SPLITS:
        for word, phones in results[split]["prons"]:
            pron[word][phones] += 1
    (out / "scenes.jsonl").write_text("\n".join(line for split in SPLITS for line in results[split]["scenes"]) + "\n")
    (out / "lexicon.txt").write_text("\n".join(f"{w} {c.most_common(1)[0][0]}" for w, c in sorted(pron.items())) + "\n")
    (out / "speakers.tsv").write_text(
        "speaker\tvoice\trate\tpitch\trange\tsplits\n"
        + "".join(
            f"{s}\t{v.name}\t{v.rate}\t{v.pitch}\t{v.pitch_range}\t{'test' if s in ids_by_split['test'] else 'train,valid'}\n"
            for s, v in voices.items()
        )
    )
    info = {
        "format_version": FORMAT_VERSION,
        "params": corpus_params(hours, seed, captions_per_image, image_size),
        "sample_rate": SAMPLE_RATE,
        "utterances": {s: results[s]["utterances"] for s in SPLITS},
        "seconds": {s: results[s]["seconds"] for s in SPLITS},
        "images": n_images,
        "speakers": ids_by_split,
        "phones": sorted({p for s in SPLITS for p in results[s]["phones"]}),
    }
    (out / "corpus.json").write_text(json.dumps(info, indent=1))
    return info


def corpus_params(hours: float, seed: int, captions_per_image: int, image_size: int) -> Dict:
    return {"hours": hours, "seed": seed, "captions_per_image": captions_per_image, "image_size": image_size}


def ensure_corpus(
    out, hours: float = 0.5, seed: int = 1, captions_per_image: int = 5, image_size: int = 64, force: bool = False
) -> dict:
    """Build the corpus at ``out`` unless a complete one with the same parameters is already there."""
    out = Path(out)
    meta = out / "corpus.json"
    params = corpus_params(hours, seed, captions_per_image, image_size)
    if meta.exists() and not force:
        info = json.loads(meta.read_text())
        if info.get("params") == params and info.get("format_version") == FORMAT_VERSION:
            logger.info("reusing the corpus at %s", out)
            return info
        raise FileExistsError(
            f"{out} holds a corpus built with {info.get('params')}; pass --force to rebuild it with {params}"
        )
    with atomic_directory(out) as tmp:
        info = build(tmp, hours, seed, captions_per_image, image_size)
    return info


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="corpus directory")
    p.add_argument("--hours", type=float, default=0.5, help="hours of training speech (valid ~10%%, test ~20%% more)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--force", action="store_true", help="rebuild even if a corpus is there")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.captions_per_image > len(TEST_VARIANTS):
        p.error(
            f"--captions-per-image must be <= {len(TEST_VARIANTS)} (one voice per caption, test has {len(TEST_VARIANTS)} voices)"
        )
    info = ensure_corpus(args.out, args.hours, args.seed, args.captions_per_image, args.image_size, args.force)
    print(json.dumps({k: info[k] for k in ("utterances", "seconds", "images")}))


if __name__ == "__main__":
    main()
