"""What ``kdctl predict`` reads: image files, folders, glob patterns and video files, as a stream of frames.

:func:`collect_sources` expands the SOURCE arguments (a folder: its image and video files, not its subfolders; a
glob pattern: its matches, ``**`` recursive) and refuses, with one :class:`KdctlError` line, a path that does not
exist, a folder or pattern without images or videos, and a file of another kind. :func:`iter_frames` decodes
them: images with torchvision (EXIF orientation applied, as viewers show them), videos frame by frame with PyAV
(the ``video`` extra; torchvision >= 0.22 has no video reader), as uint8 [3, H, W] RGB tensors.
"""

from __future__ import annotations

import glob
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kdctl.errors import KdctlError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
VIDEO_HINT = "pip install av (or the extra: pip install 'kdctl[video]')"


@dataclass(frozen=True)
class Source:
    """One input file: ``kind`` "image" or "video"."""

    path: Path
    kind: str


@dataclass
class Frame:
    """One decoded picture: ``image`` uint8 [3, H, W] RGB; ``frame`` the index in its video (None for images)."""

    source: Source
    image: object  # torch.Tensor; kept untyped so this module imports without torch
    frame: int | None = None


def kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def collect_sources(items: list[str | Path]) -> list[Source]:
    """The files the SOURCE arguments name, in order, each once; one KdctlError line for a bad argument."""
    if not items:
        raise KdctlError("pass at least one SOURCE: an image, a folder, a glob pattern or a video file")
    out: list[Source] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = [Source(f, k) for f in sorted(p.iterdir()) if f.is_file() and (k := kind_of(f))]
            if not found:
                raise KdctlError(f"{item}: the folder holds no images or videos ({_suffixes()})")
        elif p.is_file():
            kind = kind_of(p)
            if kind is None:
                raise KdctlError(f"{item}: not an image or video file ({_suffixes()})")
            found = [Source(p, kind)]
        elif glob.has_magic(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            found = [Source(f, k) for f in matches if f.is_file() and (k := kind_of(f))]
            if not found:
                raise KdctlError(f"{item}: the pattern matches no images or videos ({_suffixes()})")
        else:
            raise KdctlError(f"{item}: no such file or folder (SOURCE is an image, a folder, a glob pattern or a "
                             "video file)")
        out += [s for s in found if s not in out]
    if any(s.kind == "video" for s in out):
        require_video()
    return out


def _suffixes() -> str:
    return "looked for " + " ".join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)


def require_video() -> None:
    """One KdctlError line when no video reader is installed."""
    if importlib.util.find_spec("av") is None:
        raise KdctlError(f"reading video files needs PyAV, which is not installed ({VIDEO_HINT})")


def frame_count(source: Source) -> int | None:
    """Frames in a video as its container states them (None when it does not say); 1 for an image."""
    if source.kind == "image":
        return 1
    import av

    try:
        with av.open(str(source.path)) as container:
            n = container.streams.video[0].frames if container.streams.video else 0
    except Exception as e:  # PyAV's errors (av.error.*): not a video it can read
        raise KdctlError(f"{source.path}: cannot read the video ({_first(e)})") from e
    return int(n) or None


def iter_frames(sources: list[Source], stride: int = 1) -> Iterator[Frame]:
    """Every image, and every ``stride``-th frame of every video, decoded to uint8 [3, H, W] RGB."""
    from kdctl.data.images import decode

    for source in sources:
        if source.kind == "image":
            yield Frame(source, decode(source.path, apply_exif=True))
        else:
            yield from _video_frames(source, stride)


def _video_frames(source: Source, stride: int) -> Iterator[Frame]:
    import av
    import torch

    try:
        container = av.open(str(source.path))
    except Exception as e:
        raise KdctlError(f"{source.path}: cannot read the video ({_first(e)})") from e
    with container:
        if not container.streams.video:
            raise KdctlError(f"{source.path}: the file holds no video stream")
        n = 0
        try:
            for i, frame in enumerate(container.decode(video=0)):
                if i % stride == 0:
                    rgb = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
                    n += 1
                    yield Frame(source, torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), i)
        except KdctlError:
            raise
        except Exception as e:  # a corrupt stream part-way through
            raise KdctlError(f"{source.path}: cannot read the video at frame {n} ({_first(e)})") from e
        if n == 0:
            raise KdctlError(f"{source.path}: the video holds no frames that can be decoded")


def _first(e: BaseException) -> str:
    text = " ".join(str(e).split())[:160]
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


__all__ = ["IMAGE_SUFFIXES", "VIDEO_HINT", "VIDEO_SUFFIXES", "Frame", "Source", "collect_sources", "frame_count",
           "iter_frames", "kind_of", "require_video"]
