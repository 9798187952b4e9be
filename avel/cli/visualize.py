"""``avel visualize``: audio-guided attention drawn over the frames of one video.

Writes ``OUT/second_XX.png`` per second, ``OUT/grid.png``, ``OUT/attention.json`` and, with ``--mp4``,
``OUT/overlay.mp4``.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..inference import LocalizeError, Localizer
from ..io import atomic_write
from ..viz.attention import grid_image, middle_frames, overlays, write_overlay_video
from ..viz.images import write_png
from .args import Groups


def add(sub, g: Groups) -> None:
    p = sub.add_parser("visualize", parents=[g.common, g.checkpoint, g.weights],
                       help="audio-guided attention drawn over the frames")
    p.add_argument("video", type=Path)
    p.add_argument("--out", type=Path, default=Path("avel-attention"))
    p.add_argument("--mp4", action="store_true", help="also write an mp4 with the overlay")
    p.set_defaults(func=run)


def run(args) -> int:
    loc = Localizer.from_checkpoint(args.checkpoint, device=args.device, audio_weights=args.audio_weights,
                                    visual_weights=args.visual_weights)
    if not loc.has_attention:
        raise LocalizeError(f"{args.checkpoint}: model {loc.card.model!r} has no audio-guided attention to draw "
                            f"(its outputs: {', '.join(loc.card.outputs)})")
    result = loc.localize(args.video)
    images = overlays(middle_frames(args.video, result.seconds), result.attention)
    out: Path = args.out
    for t, img in enumerate(images):
        write_png(out / f"second_{t:02d}.png", img)
    grid = write_png(out / "grid.png", grid_image(images, classes=result.classes, background=result.background))
    atomic_write(out / "attention.json", json.dumps(result.to_dict(), indent=1))
    print(f"{args.video}: {result.seconds} s; per-second overlays and {grid} in {out}")
    if args.mp4:
        print(f"overlay video: {write_overlay_video(out / 'overlay.mp4', args.video, result.attention)}")
    return 0
