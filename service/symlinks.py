"""Which files of the model repository the server reads: only those that resolve inside it, by default.

A symbolic link in the repository (the model's directory, a version directory, `model.onnx`,
`config.json`) that leads outside it would let whoever can write the repository make the server read any
file its user can. Such a file is refused at load, with a reason that names the file inside the repository
and never the link's target, unless `follow_symlinks` is set. Links that stay inside the repository are
followed. A model given alone (`--model FILE`) was named by the operator and is read as given.
"""

from __future__ import annotations

from pathlib import Path

from service.errors import ModelLoadError


def check_inside(path: Path, root: Path | None, *, follow_symlinks: bool) -> None:
    """Raise `ModelLoadError` when `path` resolves outside `root` (a link leads out) and links may not be
    followed; nothing when `root` is None (no repository) or `follow_symlinks` is set."""
    if root is None or follow_symlinks:
        return
    resolved_root = root.resolve()
    resolved = path.resolve()
    if resolved == resolved_root or resolved_root in resolved.parents:
        return
    try:
        shown = path.relative_to(root)
    except ValueError:
        shown = Path(path.name)
    raise ModelLoadError(
        f"{shown} in the model repository is a symbolic link (or inside one) that leads outside it; "
        "set follow_symlinks to read such files"
    )
