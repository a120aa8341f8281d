"""Model definitions: one builder for each model of the registry (`cnn/registry.py`).

Every model takes a float batch shaped (N, 3, H, W), already normalised, and returns
logits shaped (N, num_classes). Each ends in one Linear layer, the head; what it takes is
the model's penultimate features (`split_head`, `Headed.features`: predict's embeddings). A model is described by a `ModelSpec` (its constructor
arguments); the spec is saved beside the weights so that a model can be rebuilt from a
weights file alone, with `torch.load(..., weights_only=True)` and no pickled code
(nanoGPT's habit). The arguments the registry declares get their defaults from there,
never from the builder's signature.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from cnn.registry import MODELS, model_info

WEIGHTS_FORMAT_VERSION = 1
# Options that only matter when a model is first built (where its starting weights come
# from); a model rebuilt from saved weights ignores them.
INIT_ONLY_OPTIONS = frozenset({"weights_path"})

Builder = Callable[..., nn.Module]
BUILDERS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """The builder of registry model `name`: each argument the registry declares for it is
    a keyword-only parameter without a default (the registry's is the one default)."""
    info = model_info(name)

    def add(builder: Builder) -> Builder:
        parameters = inspect.signature(builder).parameters
        for arg in info.args:
            p = parameters.get(arg.builder_keyword)
            if p is None or p.kind is not p.KEYWORD_ONLY or p.default is not p.empty:
                raise TypeError(f"{builder.__name__} must take {arg.builder_keyword} keyword-only, without a default")
        BUILDERS[name] = builder
        return builder

    return add


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: its registry name and constructor arguments."""

    name: str
    num_classes: int
    image_size: int
    options: dict[str, Any] = field(default_factory=dict)  # model-specific, e.g. width


def build_model(spec: ModelSpec) -> nn.Module:
    """The model `spec` describes; the registry's defaults for the arguments it leaves out."""
    info = model_info(spec.name)
    if spec.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {spec.num_classes}")
    options = {**info.defaults(), **spec.options}
    return BUILDERS[spec.name](num_classes=spec.num_classes, image_size=spec.image_size, **options)


def model_state(model: nn.Module, spec: ModelSpec) -> dict[str, Any]:
    """The weights plus the spec, as plain containers that `weights_only=True` can load."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return {
        "format_version": WEIGHTS_FORMAT_VERSION,
        "spec": asdict(spec),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def model_from_state(state: dict[str, Any]) -> tuple[nn.Module, ModelSpec]:
    spec = ModelSpec(**state["spec"])
    options = {k: v for k, v in spec.options.items() if k not in INIT_ONLY_OPTIONS}
    model = build_model(ModelSpec(spec.name, spec.num_classes, spec.image_size, options))
    model.load_state_dict(state["state_dict"])
    return model, spec


# --- the penultimate features ---------------------------------------------------------


class Headed(nn.Module):
    """A model as its body and its head: `forward` is head(body(x)), the model's own
    function; `features` is body(x), float (N, feature_width), what the head takes."""

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body, self.head = body, head

    @property
    def feature_width(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (N, 3, H, W) -> (N, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # (N, F) -> (N, classes)


def split_head(model: nn.Module) -> Headed:
    """Any registered model as a `Headed` sharing its parameters (no copy).

    `seed` and `simple` are Sequentials ending in their Linear (for `simple` the features
    are the pooled channels after Dropout, which eval mode makes the identity; for `seed`
    the flattened pooled map, 10 * ((S - 4) // 2)**2 values); torchvision's ResNet is its
    children up to `avgpool`, flattened as its own forward does, then `fc`.
    """
    if isinstance(model, Headed):
        return model
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):
        return Headed(model[:-1], model[-1])
    # A ResNet exists only once torchvision is imported: importing it here would cost every
    # seed or simple model ~1.2 s (2 cores), on predict's way to its first row.
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is not None and isinstance(model, resnet.ResNet):
        children = [m for name, m in model.named_children() if name != "fc"]
        return Headed(nn.Sequential(*children, nn.Flatten(1)), model.fc)
    raise TypeError(f"{type(model).__name__} does not end in one Linear layer: no penultimate features")


# --- initialisation -------------------------------------------------------------------


def init_weights(model: nn.Module) -> nn.Module:
    """Explicit initialisation, so results do not hang on PyTorch's defaults changing.

    Convolutions: He (fan_out, ReLU), as torchvision's ResNet. Linear layers: Glorot
    uniform with zero bias, which is what the Keras tutorial's Dense layer used.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# --- the models ------------------------------------------------------------------------


@register_model("seed")
def seed(*, num_classes: int, image_size: int) -> nn.Module:
    """The tutorial's network: Conv2d(3, 10, 5) + ReLU, MaxPool 2x2, Flatten, Linear."""
    conv_out = image_size - 5 + 1  # (W - F + 2P)/S + 1 with F=5, P=0, S=1
    pooled = conv_out // 2
    if pooled < 1:
        raise ValueError(f"image_size {image_size} is too small for 'seed' (needs >= 6)")
    return init_weights(
        nn.Sequential(
            nn.Conv2d(3, 10, kernel_size=5, stride=1, padding=0),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(10 * pooled * pooled, num_classes),
        )
    )


@register_model("simple")
def simple(
    *,
    num_classes: int,
    image_size: int,
    depth: int,
    width: int,
    convs_per_stage: int = 1,
    dropout: float = 0.1,
) -> nn.Module:
    """The tutorial's "add more convolution and pooling layers", done the modern way.

    `depth` stages of (conv3x3-BN-ReLU) x `convs_per_stage` + MaxPool 2x2, channels
    doubling from `width`; then global average pooling and a linear classifier.
    """
    if image_size < 2**depth:
        raise ValueError(f"image_size {image_size} is too small for depth {depth}")
    layers: list[nn.Module] = []
    channels_in = 3
    for stage in range(depth):
        channels_out = width * 2**stage
        for _ in range(convs_per_stage):
            layers += [
                nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels_out),
                nn.ReLU(inplace=True),
            ]
            channels_in = channels_out
        layers.append(nn.MaxPool2d(2))
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(channels_in, num_classes),
    ]
    return init_weights(nn.Sequential(*layers))


@register_model("resnet18")
def resnet18(*, num_classes: int, image_size: int, weights_path: str | None) -> nn.Module:
    """torchvision's ResNet-18, from scratch or from a local weights file.

    `weights_path` is a state_dict saved by torchvision (e.g. `resnet18-f37072fd.pth`
    copied next to your data); the classifier is replaced when its size differs.
    Nothing is downloaded.
    """
    from torchvision.models import resnet18 as tv_resnet18

    del image_size  # global pooling: any size >= 32 works
    model = tv_resnet18(weights=None, num_classes=num_classes)  # torchvision inits explicitly
    if weights_path:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        if state["fc.weight"].shape[0] != num_classes:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, _ = model.load_state_dict(state, strict=False)
        if set(missing) - {"fc.weight", "fc.bias"}:
            raise ValueError(f"{weights_path} is not a ResNet-18 state_dict (missing {missing[:3]})")
    return model


if set(BUILDERS) != set(MODELS):  # a model declared in cnn/registry.py without a builder here
    raise ImportError(f"cnn/registry.py declares {sorted(MODELS)}; cnn/models.py builds {sorted(BUILDERS)}")
