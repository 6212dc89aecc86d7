import pickle

import pytest
import torch
from torch import nn

from fadrm.errors import ConfigError, WeightsError
from fadrm.models import ARCHS, create_model, has_batchnorm
from fadrm.weights import load_weights, read_card, save_weights

REQUIRED = {"convnet", "resnet18", "resnet50", "densenet121", "mobilenetv2", "shufflenetv2"}


def test_registry_has_the_required_architectures():
    assert REQUIRED <= set(ARCHS)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("resolution", [32, 224])
def test_every_entry_builds_and_runs(arch, resolution):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=7, resolution=resolution).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, resolution, resolution))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert has_batchnorm(model)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "mobilenetv2", "shufflenetv2"])
def test_small_inputs_get_the_cifar_stem(arch):
    small = create_model(arch, 10, 32)
    large = create_model(arch, 10, 224)
    first = lambda m: next(x for x in m.modules() if isinstance(x, nn.Conv2d))  # noqa: E731
    assert first(small).stride == (1, 1) and first(small).kernel_size == (3, 3)
    assert first(large).stride == (2, 2)
    pools = lambda m: [x for x in m.modules() if isinstance(x, nn.MaxPool2d)]  # noqa: E731
    if pools(large):
        assert len(pools(small)) < len(pools(large))


def test_unknown_arch_and_pretrained_small_stem():
    with pytest.raises(ConfigError, match="unknown architecture"):
        create_model("vgg99", 10, 32)
    with pytest.raises(ConfigError, match="CIFAR-style stem"):
        create_model("resnet18", 10, 32, pretrained=True)


def test_weights_roundtrip_with_card(tmp_path):
    model = create_model("convnet", 10, 32)
    card = save_weights(model, tmp_path / "m.safetensors", {"arch": "convnet", "top1": 0.5})
    assert len(card["sha256"]) == 64 and read_card(tmp_path / "m.safetensors")["top1"] == 0.5
    other = load_weights(create_model("convnet", 10, 32), tmp_path / "m.safetensors")
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_pickled_state_dict_loads_safely(tmp_path):
    model = create_model("convnet", 10, 32)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "m.pth")
    loaded = load_weights(create_model("convnet", 10, 32), tmp_path / "m.pth")
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Exploit()}, fh)
    with pytest.raises(WeightsError, match="cannot load weights safely"):
        load_weights(create_model("convnet", 10, 32), path)
    assert "must never run" not in capsys.readouterr().out


def test_mismatched_weights_are_explained(tmp_path):
    save_weights(create_model("convnet", 10, 32), tmp_path / "m.safetensors", {"arch": "convnet"})
    with pytest.raises(WeightsError, match="does not fit"):
        load_weights(create_model("convnet", 100, 32), tmp_path / "m.safetensors")
    with pytest.raises(WeightsError, match="not found"):
        load_weights(create_model("convnet", 10, 32), tmp_path / "absent.safetensors")
