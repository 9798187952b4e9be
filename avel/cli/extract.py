"""``avel extract``: videos -> a feature store; ``avel extract merge OUT`` joins finished shards.

Every video given or found gets a manifest row. Exit code 0 when every row was extracted, 1 when some
failed (each named with its one-line reason on stderr and in ``manifest.jsonl``; the others are in the
store), 2 when nothing could run (a bad input list, the backbones, another extraction holding
``--out``, a full disk: one line ``avel extract: error: ...``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..features import build_backbones
from ..features.extract import collect_videos, extract, merge_shards, read_manifest, shard_from_env
from .args import Groups

SHOWN_FAILURES = 20     # failed rows listed on stderr (all are in the manifest)


class UsageError(ValueError):
    """A command line that argparse accepts but that makes no sense."""


def add(sub, g: Groups) -> None:
    p = sub.add_parser("extract", parents=[g.common, g.weights, g.progress],
                       help="videos -> feature store (official h5 layout); `avel extract merge OUT` joins shards")
    p.add_argument("inputs", nargs="+", help="video folder, file list, Annotations.txt, or video files")
    p.add_argument("--out", type=Path, help="feature folder to write")
    p.add_argument("--video-dir", type=Path, help="where the videos named by an Annotations.txt are")
    p.add_argument("--audio", default="logmel", help="audio backbone: logmel (offline default) | vggish")
    p.add_argument("--visual", default="efficientnet-lite0",
                   help="visual backbone: efficientnet-lite0 (offline default) | vgg19-pool5")
    p.add_argument("--visual-size", type=int, help="frame size for efficientnet-lite0 (default 224: a 7x7 grid)")
    p.add_argument("--seconds", type=int, default=10, help="segments per video in the store (AVE: 10)")
    p.add_argument("--fps", type=int, default=16, help="frames per second averaged per segment (AVE: 16)")
    p.add_argument("--batch-frames", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="parallel decoding threads")
    p.add_argument("--num-shards", type=int)
    p.add_argument("--shard-index", type=int)
    p.add_argument("--retry-failed", action="store_true", help="on resume, try again the videos that failed")
    p.add_argument("--keep-parts", action="store_true", help="keep the per-video parts after the store is written")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.inputs[0] == "merge":
        if len(args.inputs) != 2:
            raise UsageError("usage: avel extract merge OUT")
        result = merge_shards(args.inputs[1])
        print(result)
        return report_failures(result)
    if args.out is None:
        raise UsageError("--out is required")
    items, annotations = collect_videos(args.inputs, video_dir=args.video_dir)
    num_shards, shard_index = shard_from_env(args.num_shards, args.shard_index)
    audio, visual = build_backbones(args.audio, args.visual, audio_weights=args.audio_weights,
                                    visual_weights=args.visual_weights, device=args.device,
                                    visual_size=args.visual_size)
    result = extract(items, args.out, audio_backbone=audio, visual_backbone=visual, seconds=args.seconds,
                     fps=args.fps, batch_frames=args.batch_frames, workers=args.workers, num_shards=num_shards,
                     shard_index=shard_index, progress=not args.no_progress, annotations=annotations,
                     keep_parts=args.keep_parts, retry_failed=args.retry_failed)
    print(result)
    return report_failures(result)


def report_failures(result) -> int:
    """One stderr line per failed row (the first SHOWN_FAILURES); 1 when any failed, else 0."""
    if not result.failed:
        return 0
    failed = [m for m in read_manifest(result.out_dir) if m["status"] == "failed"]
    for m in failed[:SHOWN_FAILURES]:
        print(f"avel extract: failed: row {m['row']}: {m['error']}", file=sys.stderr)
    if len(failed) > SHOWN_FAILURES:
        print(f"avel extract: ... and {len(failed) - SHOWN_FAILURES} more failed rows (see {result.manifest})",
              file=sys.stderr)
    return 1
