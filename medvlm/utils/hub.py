"""Telling a Hugging Face hub id from a local path, in one place.

A hub id is ``owner/name`` (letters, digits, ``_``, ``.``, ``-``; one slash). A name that exists on
disk is a local path even when it has that shape (``runs/adapter``), and so is one whose ``owner``
is a local folder; a name with more slashes, a leading ``/``, ``.`` or ``~``, or a Windows
separator is a path, existing or not.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path: neither ``name`` nor a folder ``owner`` exists here
    (``runs/stage2`` beside a ``runs/`` folder is a mistyped path, not a hub id)."""
    return bool(HUB_ID.match(name)) and not Path(name).exists() and not Path(name.split("/")[0]).is_dir()


def looks_like_missing_folder(name: str) -> bool:
    """A path-shaped name (a separator, or a leading ``.`` / ``~``) that is not a hub id and does not
    exist: loading it can only fail, so say so before reaching the hub. A bare name (``gpt2``) is
    left to the hub."""
    if Path(name).expanduser().exists() or looks_like_hub_id(name):
        return False
    if HUB_ID.match(name):  # owner/name whose owner is a local folder
        return True
    return os.sep in name or bool(os.altsep and os.altsep in name) or name.startswith((".", "~"))
