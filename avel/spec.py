"""Feature spec: what made a feature store, so a checkpoint can refuse features of another kind."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class StreamSpec:
    """One modality's features. ``grid`` is (H, W) for spatial visual maps, () for vectors."""

    backbone: str                 # 'vggish' | 'logmel' | 'vgg19-pool5' | 'efficientnet-lite0' | 'synthetic' | ...
    dim: int                      # channels per position
    grid: tuple[int, ...] = ()    # (7, 7) for pool5-like maps
    fps: float = 1.0              # feature vectors per second of video (1 for AVE)
    frames_per_segment: int = 1   # frames averaged into one visual vector (16 for AVE)
    sample_rate: int = 0          # audio sample rate the backbone consumed (16000 for VGGish)
    weights: str = ""             # which weights made it ('keras-imagenet', 'torchvision-imagenet', 'random', ...)
    preprocessing: str = ""       # e.g. 'caffe-bgr-mean', 'torchvision-rgb-std'
    input_size: tuple[int, ...] = ()  # (H, W) frames were resized to before the CNN; () for audio


    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StreamSpec:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["grid"] = tuple(known.get("grid", ()))
        known["input_size"] = tuple(known.get("input_size", ()))
        return cls(**known)


@dataclass(frozen=True)
class FeatureSpec:
    audio: StreamSpec
    visual: StreamSpec
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"audio": self.audio.to_dict(), "visual": self.visual.to_dict(), **({"extra": self.extra} if self.extra else {})}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(StreamSpec.from_dict(d["audio"]), StreamSpec.from_dict(d["visual"]), dict(d.get("extra", {})))

    def compatible_with(self, other: FeatureSpec) -> list[str]:
        """Reasons these features cannot feed a model trained on ``other`` (empty when they can)."""
        problems = []
        for name in ("audio", "visual"):
            a, b = getattr(self, name), getattr(other, name)
            for key in ("backbone", "dim", "grid", "weights", "input_size"):
                if key == "input_size" and not (a.input_size and b.input_size):
                    continue  # older specs do not record it
                if getattr(a, key) != getattr(b, key):
                    problems.append(f"{name} {key}: features have {getattr(a, key)!r}, model expects {getattr(b, key)!r}")
        return problems


# The official AVE release (Tian et al. 2018): VGGish 128-d audio, VGG19 pool5 7x7x512 visual,
# 16 frames per second averaged, Keras ImageNet weights with Caffe preprocessing.
AVE_OFFICIAL = FeatureSpec(
    audio=StreamSpec("vggish", 128, (), 1.0, 1, 16000, "vggish-audioset", "vggish-logmel"),
    visual=StreamSpec("vgg19-pool5", 512, (7, 7), 1.0, 16, 0, "keras-imagenet", "caffe-bgr-mean", (224, 224)),
)
