"""Videos with captions (MSR-VTT and the like) -> T frames per sample, for EVLGen-video.

Each sample holds ``KEY.0.jpg`` ... ``KEY.{T-1}.jpg`` (frames sampled uniformly: the middle
frame of each of T equal segments, decoded with PyAV), ``KEY.txt`` (first caption) and
``KEY.json`` (all captions, video id, frame count, duration). Annotations:

- MSR-VTT's ``{"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption"}]}``
  (``train_val_videodatainfo.json``, ``test_videodatainfo.json``); videos are
  ``--videos/VIDEO_ID.mp4`` (or .avi/.mkv/.webm); ``--split`` picks one split;
- a list ``[{"video": "file.mp4", "caption": str or [str]}]`` (BLIP's ``msrvtt_test.json``).
"""
import io
import os
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from . import writer
from .annotations import Parsed, describe, load_json, require_dir
from .captions import clean_captions
from .errors import DataPrepError
from .images import JPEG_QUALITY, _resize, _to_rgb
from .reasons import BAD_ROW, EMPTY_CAPTION, MISSING_FILE, Skip

NAME = "video"
HELP = "a folder of videos + captions json (MSR-VTT style) -> T uniformly sampled frames per sample"
EXPECTED = ("video captions JSON: MSR-VTT's {'videos': [{'video_id', 'split'}], 'sentences': "
            "[{'video_id', 'caption'}]} or a list [{'video': 'file.mp4', 'caption': str or [str]}]")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
NOT_A_VIDEO = "not a video"  # unreadable container or no decodable video frame


class VideoRow(NamedTuple):
    paths: tuple  # candidate files, the first that exists is used
    captions: tuple
    video_id: str
    split: str


def frame_indices(num_frames: int, count: int) -> list[int]:
    """The middle frame of each of ``count`` equal segments of ``num_frames`` frames."""
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    return [min(num_frames - 1, int((i + 0.5) * num_frames / count)) for i in range(count)]


def sample_frames(path: str, count: int):
    """``count`` uniformly sampled frames of a video as PIL images (PyAV), and its frame count
    and duration in seconds. Raises :class:`Skip` for an unreadable video."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise Skip(NOT_A_VIDEO, f"{path}: no video stream")
            stream = container.streams.video[0]
            duration = float(stream.duration * stream.time_base) if stream.duration else None
            # stream.frames is a header value (0 when unknown): decode everything once, keeping
            # only what could be needed would need the count first, so collect then pick.
            frames = [frame.to_image() for frame in container.decode(stream)]
    except av.error.FFmpegError as err:
        raise Skip(NOT_A_VIDEO, f"{path}: {err}") from None
    if not frames:
        raise Skip(NOT_A_VIDEO, f"{path}: no decodable frame")
    return [frames[i] for i in frame_indices(len(frames), count)], len(frames), duration


class VideoSampler:
    """Picklable ``make_sample``: T frames as JPEGs plus captions."""

    def __init__(self, num_frames: int, image_size: int, resize_mode: str):
        self.num_frames, self.image_size, self.resize_mode = num_frames, image_size, resize_mode

    def __call__(self, row_index: int, row: VideoRow) -> dict:
        path = next((p for p in row.paths if os.path.isfile(p)), None)
        if path is None:
            raise Skip(MISSING_FILE, str(row.paths[0]))
        frames, total, duration = sample_frames(path, self.num_frames)
        sample = {}
        for i, frame in enumerate(frames):
            frame = _to_rgb(frame)
            if self.image_size > 0 and self.resize_mode != "no":
                frame = _resize(frame, self.image_size, self.resize_mode)
            buf = io.BytesIO()
            frame.save(buf, "JPEG", quality=JPEG_QUALITY)
            sample[f"{i}.jpg"] = buf.getvalue()
        sample["txt"] = row.captions[0]
        sample["json"] = {"source": NAME, "video_id": row.video_id, "captions": list(row.captions),
                          "split": row.split, "num_frames": self.num_frames, "video_frames": total,
                          "duration": duration, "file": os.path.basename(path), "size": list(frames[0].size)}
        return sample


def _candidates(videos: Path, name: str) -> tuple:
    if Path(name).suffix:
        return (str(videos / name), str(videos / Path(name).name))
    return tuple(str(videos / f"{name}{ext}") for ext in VIDEO_EXTENSIONS)


def parse(data, videos: Path, split: str | None, max_words: int) -> Parsed:
    """Rows of either annotation format (see the module docstring), in file order."""
    out = Parsed()
    if isinstance(data, dict) and isinstance(data.get("videos"), list) and isinstance(data.get("sentences"), list):
        captions = defaultdict(list)
        for n, s in enumerate(data["sentences"]):
            if not isinstance(s, dict) or "video_id" not in s:
                out.fail(BAD_ROW, f"sentences[{n}]: expected {{'video_id', 'caption'}}, got {str(s)[:80]}")
                continue
            captions[str(s["video_id"])].append(s.get("caption"))
        for n, v in enumerate(data["videos"]):
            if not isinstance(v, dict) or "video_id" not in v:
                out.fail(BAD_ROW, f"videos[{n}]: expected {{'video_id', 'split'}}, got {str(v)[:80]}")
                continue
            vid, vsplit = str(v["video_id"]), str(v.get("split", "all"))
            if split is not None and vsplit != split:
                continue
            caps = clean_captions(captions[vid], max_words)
            if not caps:
                out.fail(EMPTY_CAPTION, f"video {vid}")
                continue
            out.rows.append(VideoRow(_candidates(videos, vid), tuple(caps), vid, vsplit))
    elif isinstance(data, list):
        for n, item in enumerate(data):
            if not isinstance(item, dict) or not isinstance(item.get("video"), str):
                out.fail(BAD_ROW, f"[{n}]: expected {{'video': str, 'caption': str or [str]}}, got {str(item)[:80]}")
                continue
            caps = clean_captions(item.get("caption", item.get("captions")), max_words)
            if not caps:
                out.fail(EMPTY_CAPTION, f"[{n}]: {item['video']}")
                continue
            out.rows.append(VideoRow(_candidates(videos, item["video"]), tuple(caps),
                                     Path(item["video"]).stem, split or "all"))
    else:
        raise DataPrepError(f"expected {EXPECTED}; found {describe(data)}")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--annotations", required=True, help="captions JSON (" + EXPECTED + ")")
    parser.add_argument("--videos", required=True, help="directory holding the video files")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled uniformly per video (default 8)")
    parser.add_argument("--split", default=None,
                        help="MSR-VTT: keep only videos of this split (train, validate, test); default all")


def run(args) -> dict:
    if args.frames < 1:
        raise DataPrepError(f"--frames must be at least 1, got {args.frames}")
    videos = require_dir(args.videos, "the video files")
    try:
        data = load_json(args.annotations, EXPECTED)
        parsed = parse(data, videos, args.split, args.max_words)
    except DataPrepError as err:
        raise DataPrepError(f"{args.annotations}: {err}" if not str(err).startswith(str(args.annotations))
                            else str(err)) from None
    split = args.split or "all"
    is_eval = split in ("val", "validate", "test")
    prefix = args.prefix or (NAME if split in ("train", "all") else f"{NAME}_{split}")
    fingerprint = {"inputs": [[str(Path(args.annotations).resolve()), Path(args.annotations).stat().st_size]],
                   "videos": str(videos.resolve()), "split": split, "frames": args.frames,
                   "max_words": args.max_words, "image_size": args.image_size, "resize_mode": args.resize_mode}
    sampler = VideoSampler(args.frames, args.image_size, args.resize_mode)
    return writer.write_dataset(
        args.out, prefix, NAME, parsed.rows, sampler, shard_size=args.shard_size, fingerprint=fingerprint,
        parse_failures=parsed.failures, parse_examples=parsed.examples,
        extra={"split": split, "eval": is_eval, "num_frames": args.frames},
        workers=args.workers or os.cpu_count() or 1, overwrite=args.overwrite, min_shards=args.min_shards,
        show_progress=not args.no_progress, part=args.part)
