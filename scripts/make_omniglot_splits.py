"""Write the character splits of Finn et al. (2017) and Sung et al. (2018) for Omniglot.

    python scripts/make_omniglot_splits.py            # writes src/metalab/data/splits/omniglot/finn/
    python scripts/make_omniglot_splits.py --check    # exits 1 if the committed files differ

Both papers' code pools the 1,623 characters of the two archives, shuffles them with Python's
`random.seed(1)` and cuts the list: Finn (cbfinn/maml `data_generator.py`) keeps the first 1,100
for meta-training, the next 100 for validation and the last 423 for testing; Sung
(floodsung/LearningToCompare_FSL `omniglot/task_generator.py`) trains on the first 1,200 and
tests on the same last 423. Their order before the shuffle is `os.listdir`'s, which no file
system promises, so their exact lists cannot be rebuilt; this script shuffles the sorted
character names with its own seeded generator instead, which gives a split of the same kind
that anyone regenerates byte for byte. Every rotation of a character goes to the character's
side, so no test class is a rotated training character.
"""

import argparse
import random
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "src" / "metalab" / "data" / "splits" / "omniglot" / "finn"
ARCHIVES = ("images_background.zip", "images_evaluation.zip")
SEED = 1
SIZES = {"train": 1100, "val": 100, "test": 423}
ROTATIONS = ("rot000", "rot090", "rot180", "rot270")


def characters(omniglot_dir: Path) -> list[str]:
    """The sorted 'Alphabet/characterNN' names of both archives."""
    names = set()
    for archive in ARCHIVES:
        with zipfile.ZipFile(omniglot_dir / archive) as zf:
            for member in zf.namelist():
                parts = member.split("/")  # images_background/Alphabet/characterNN/file.png
                if member.lower().endswith(".png") and len(parts) >= 3:
                    names.add("/".join(parts[-3:-1]))
    return sorted(names)


def split_texts(names: list[str]) -> dict[str, str]:
    if len(names) != sum(SIZES.values()):
        raise SystemExit(f"expected {sum(SIZES.values())} characters in the archives, found {len(names)}")
    shuffled = list(names)
    random.Random(SEED).shuffle(shuffled)
    texts, start = {}, 0
    for split, size in SIZES.items():
        chosen = shuffled[start : start + size]
        start += size
        texts[split] = "".join(f"{char}/{rotation}\n" for char in chosen for rotation in ROTATIONS)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data", help="holds omniglot/")
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args()
    texts = split_texts(characters(args.data_dir / "omniglot"))
    if args.check:
        stale = [
            s for s, text in texts.items() if not (OUT / f"{s}.txt").is_file() or (OUT / f"{s}.txt").read_text() != text
        ]
        if stale:
            sys.exit(f"{OUT}: {', '.join(stale)} differ from what this script writes; run it without --check")
        print(f"{OUT}: up to date")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (OUT / f"{split}.txt").write_text(text)
    print(f"wrote {OUT}: " + ", ".join(f"{s} {SIZES[s]} characters" for s in SIZES))


if __name__ == "__main__":
    main()
