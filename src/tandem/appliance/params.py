"""Path parameters of the API, declared once with the shapes of ``tandem.domain.ids``.

A value of the wrong shape (``../apps/x``, ``img_x%2F..``) is answered 422 naming the
parameter before any route runs, so an id can only ever name the kind of thing it is for.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

from tandem.domain.ids import IMAGE_ID_PATTERN, JOB_ID_PATTERN, NAME_PATTERN

Name = Annotated[
    str,
    Path(
        pattern=NAME_PATTERN,
        description="A name: 1-64 letters, digits, '.', '_' or '-', starting with a letter "
        "or digit.",
    ),
]
ImageId = Annotated[
    str,
    Path(pattern=IMAGE_ID_PATTERN, description="An image id such as img_k3v7q2m9a4bx."),
]
JobId = Annotated[
    str,
    Path(pattern=JOB_ID_PATTERN, description="A job id such as job_4fq2w7xkz3ma."),
]
