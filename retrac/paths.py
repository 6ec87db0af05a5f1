"""Confining paths to a configured root, so that no path a client gives can leave it."""

from __future__ import annotations

from pathlib import Path

from retrac.exceptions import SpecError


def resolve_inside(root: Path | None, path: str | Path) -> Path:
    """`path` resolved against `root` (symlinks followed); an error if it ends up outside `root`.

    The one confinement rule: every path a spec names and every file a dataset folder holds goes
    through it, when an index is created and again whenever it is reopened, so a link added later
    cannot lead outside either. Messages name only the path's last part, never the server's folders.

    With no root, the path is only resolved: the caller is trusted (the CLI on the user's machine).
    """
    if "\x00" in str(path):
        raise SpecError(f"path {str(path)!r} contains a NUL byte; give a plain file or folder path")
    if root is None:
        return Path(path).expanduser().resolve()
    base = Path(root).resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base):
        raise SpecError(
            f"path {Path(path).name!r} leaves the configured root (through '..' or a link); give a "
            "path inside it"
        )
    return target


def confine_folder(root: Path | None, folder: Path, what: str) -> Path:
    """`folder` (a model part: a checkpoint, its scheduler, VAE, text encoder or tokenizer) as it is,
    after checking that it and every file in it resolve inside `root` (symlinks followed).

    `resolve_inside` confines the paths a spec names; the parts found beside a checkpoint (`vae/`,
    `scheduler/`, `text_encoder/`, `tokenizer/`) and the files inside any model folder are not named
    by the client, so without this a link among them would lead anywhere. `what` names the part in
    the message, which names only the folder's last part. With no root, nothing is checked.
    """
    if root is None:
        return folder
    base = Path(root).resolve()
    for path in (folder, *sorted(folder.rglob("*"))):
        if not path.resolve().is_relative_to(base):
            where = folder.name if path == folder else f"{folder.name}/{path.relative_to(folder)}"
            raise SpecError(
                f"the {what} {where!r} leads outside the configured root through a link; put the {what} "
                "itself inside the root"
            )
    return folder
