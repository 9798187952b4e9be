"""Video list -> feature store, in four parts that only look down:

- :mod:`.inputs`: which videos, in which rows (folders, lists, files, an ``Annotations.txt``);
- :mod:`.video`: one video streamed through the backbones (any length, bounded memory);
- :mod:`.job`: the resumable, shardable job over a list (decoding threads ahead of the CNN);
- :mod:`.writer`: per-video parts, the finished store (h5 files, ``features.json``, ``manifest.jsonl``)
  and the merge of shards.
"""
from .inputs import VIDEO_EXTENSIONS, VideoItem, collect_videos
from .job import extract, shard_from_env
from .video import DEFAULT_CHUNK_SECONDS, VideoFeatures, extract_video, features_of
from .writer import PARTS, ExtractResult, merge_shards, read_manifest, shard_dir

__all__ = ["DEFAULT_CHUNK_SECONDS", "PARTS", "VIDEO_EXTENSIONS", "ExtractResult", "VideoFeatures", "VideoItem",
           "collect_videos", "extract", "extract_video", "features_of", "merge_shards", "read_manifest",
           "shard_dir", "shard_from_env"]
