"""script/verify-weights: the full check of a weights folder against DIR/manifest.json (sizes and
sha256 of every file, show1.weights.manifest.verify_manifest), with a progress bar."""

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ..layout import WeightsError
from ..manifest import MANIFEST_NAME, read_manifest, verify_manifest
from .download import PROJECT_WEIGHTS_DIR, format_size


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="script/verify-weights",
        description="Check every Show-1 weights file against DIR/manifest.json (sizes and sha256).",
    )
    parser.add_argument("weights_dir", nargs="?", type=Path, default=PROJECT_WEIGHTS_DIR,
                        help="the weights folder (default: weights/ of this project)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """script/verify-weights: exit status 0 when every file matches, 1 naming every bad file."""
    weights_dir = _parse_args(argv).weights_dir
    try:
        total = sum(e.size for e in read_manifest(weights_dir))
        with tqdm(total=total, unit="B", unit_scale=True, desc="verifying", file=sys.stderr) as bar:
            entries = verify_manifest(weights_dir, bar.update)
    except WeightsError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"OK: {len(entries)} files in {weights_dir} match {MANIFEST_NAME} ({format_size(total)} verified)")
    return 0
