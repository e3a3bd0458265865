"""Files that appear under their final name only once complete."""

import os
import secrets
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_atomically(target):
    """Yields a fresh temporary path beside `target` to write to. When the block ends normally the
    file is renamed to `target` (atomically: a reader sees the old file or the new one, never half
    of one); when it raises, cancellations included, the temporary file is removed and `target` is
    left as it was. So a crash or a full disk never leaves a truncated file under a final name.

    The temporary name is hidden, unique (concurrent writers never share it), keeps the target's
    extension (encoders pick the format from it) and starts with `.partial-`, which .dockerignore
    leaves out of images."""
    target = Path(target)
    partial = target.with_name(f".partial-{secrets.token_hex(4)}-{target.name}")
    try:
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
