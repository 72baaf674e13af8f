"""SpokenCOCO-style caption json -> ``{split}.tsv`` plus per-utterance image index and transcripts.

    mtssl-manifest-spokencoco SpokenCOCO/SpokenCOCO_val_unrolled_karpathy.json \\
        --audio-root SpokenCOCO --image-root mscoco --dest manifests/coco --split valid

Input: ``{"data": [{"image": IMG, "captions": [{"wav", "text", "speaker", "uttid"}, ...]}, ...]}``
with ``wav`` relative to ``--audio-root`` and ``image`` relative to ``--image-root``.

Outputs, aligned line for line with ``{split}.tsv``:
  ``{split}.img``   index of the utterance's image in ``{split}.images`` (0-based)
  ``{split}.wrd``   the caption text; ``{split}.ltr`` its letters; ``{split}.spk`` the speaker
and ``{split}.images``: the split's images, one relative path a line, in first-seen order.
"""

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

from ..data.manifest import write_lines, write_manifest
from ..errors import MtsslError, cli
from .common import count_samples, letters, write_dictionary


class CaptionFileError(MtsslError, ValueError):
    pass


def read_caption_entries(json_path) -> List[dict]:
    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CaptionFileError(f"{json_path}: not a SpokenCOCO-style caption file ({err})") from err
    if not isinstance(data, list) or not data:
        raise CaptionFileError(f"{json_path}: 'data' must be a non-empty list of entries")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise CaptionFileError(
                f"{json_path}: data[{i}] is a {type(entry).__name__}, not an object with 'image' and 'captions'"
            )
        captions = entry.get("captions", [])
        if not isinstance(captions, list) or not all(isinstance(c, dict) for c in captions):
            raise CaptionFileError(f"{json_path}: data[{i}].captions must be a list of objects with 'wav'")
    return data


def build_spokencoco_manifest(
    json_path, audio_root, image_root: Optional[str], dest, split, workers: int = 0, check_images: bool = True
) -> int:
    audio_root, dest = Path(audio_root).resolve(), Path(dest)
    image_index: Dict[str, int] = {}
    utts = []  # (wav, text, speaker, image index, where)
    for i, entry in enumerate(read_caption_entries(json_path)):
        where = f"{json_path}: data[{i}]"
        image = entry.get("image")
        if not image:
            raise CaptionFileError(f"{where}: no 'image'")
        if check_images and image_root is not None and not (Path(image_root) / image).exists():
            raise FileNotFoundError(f"{where}: image {image} not found under {image_root}")
        idx = image_index.setdefault(image, len(image_index))
        for j, cap in enumerate(entry.get("captions", [])):
            if "wav" not in cap:
                raise CaptionFileError(f"{where}.captions[{j}]: no 'wav'")
            utts.append((cap["wav"], cap.get("text", ""), cap.get("speaker", "unknown"), idx, f"{where}.captions[{j}]"))
    if not utts:
        raise CaptionFileError(f"{json_path}: no captions")
    sizes = count_samples([str(audio_root / u[0]) for u in utts], [u[4] for u in utts], workers=workers)
    n = write_manifest(dest / f"{split}.tsv", audio_root, zip([u[0] for u in utts], sizes))
    write_lines(dest / f"{split}.img", (str(u[3]) for u in utts))
    write_lines(dest / f"{split}.images", image_index)
    write_lines(dest / f"{split}.spk", (u[2] for u in utts))
    write_lines(dest / f"{split}.wrd", (u[1].lower() for u in utts))
    write_lines(dest / f"{split}.ltr", (letters(u[1]) for u in utts))
    if split == "train":  # dictionaries come from the training split only
        write_dictionary(dest / "dict.ltr.txt", (c for u in utts for c in letters(u[1]).split()))
    return n


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json")
    p.add_argument("--audio-root", required=True)
    p.add_argument("--image-root", default=None, help="check every image exists under this directory")
    p.add_argument("--dest", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--workers", type=int, default=0)
    a = p.parse_args(argv)
    n = build_spokencoco_manifest(a.json, a.audio_root, a.image_root, a.dest, a.split, a.workers)
    print(f"{a.split}={n}")


if __name__ == "__main__":
    main()
