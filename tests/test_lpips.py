"""LPIPS beside PSNR and SSIM.

The `lpips` package imports torchvision, and PyPI's torchvision does not load against the CPU torch
build these tests run on. So the package's own code runs here over a stand-in `torchvision.models`
whose vgg16 has torchvision's exact layer layout and random weights, and the result is checked
against LPIPS computed independently (float64, the v0.1 linear weights read from the package's
file). With real torchvision and its ImageNet weights, the same code gives the published metric;
where the package does not import, metrics.json says so and holds no LPIPS value.
"""

import copy
import hashlib
import http.server
import importlib
import json
import os
import sys
import threading
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from helpers import cli, run_dirs

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
TAPS = (3, 8, 15, 22, 29)          # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features


def random_vgg16_features(seed=0):
    layers, c = [], 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    features = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in features:
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return features


@pytest.fixture
def lpips_over_standin_torchvision(monkeypatch):
    """The real lpips package, importing a stand-in torchvision (models.vgg16 with random weights)."""
    features = random_vgg16_features()
    tv, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")

    def vgg16(pretrained=False, **_):
        net = nn.Module()
        net.features = features
        return net

    models.vgg16 = vgg16
    tv.models = models
    for name in [n for n in sys.modules if n == "lpips" or n.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    try:
        lpips = importlib.import_module("lpips")
    except ImportError:
        pytest.fail("the lpips package is not installed (.ci/run installs it with --no-deps)")
    monkeypatch.setattr(utils, "_LPIPS", {})
    yield lpips, features
    for name in [n for n in sys.modules if n == "lpips" or n.startswith("lpips.")]:
        sys.modules.pop(name, None)


def independent_lpips(features, lpips_module, x, y):
    """LPIPS (Zhang et al. 2018, v0.1) from its definition, float64: inputs in [−1, 1], the scaling
    layer, unit-normalised features at five taps, squared differences weighted per channel by the
    linear layers, averaged over space, summed over taps."""
    path = os.path.join(os.path.dirname(lpips_module.__file__), "weights", "v0.1", "vgg.pth")
    lin = torch.load(path, map_location="cpu", weights_only=True)
    shift = torch.tensor([-.030, -.088, -.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450], dtype=torch.float64).view(1, 3, 1, 1)
    net = copy.deepcopy(features).double()

    def taps(img):
        h, out = ((2 * img.double() - 1) - shift) / scale, []
        for i, layer in enumerate(net):
            h = layer(h)
            if i in TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        w = lin[f"lin{k}.model.1.weight"].double()
        total = total + F.conv2d((a - b) ** 2, w).mean((2, 3))
    return total.flatten()


def test_lpips_through_the_package_matches_its_definition(lpips_over_standin_torchvision):
    lpips, features = lpips_over_standin_torchvision
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 48, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert utils.lpips_unavailable("vgg") is None or "backbone weights" in utils.lpips_unavailable("vgg")
    got = utils.lpips_distance(x, y, "vgg")
    want = independent_lpips(features, lpips, x, y)
    assert np.allclose(got, want.numpy(), rtol=1e-4), (got, want)
    assert utils.lpips_distance(x, x, "vgg") == [0.0, 0.0]
    gray = x[:, :1]
    assert np.allclose(utils.lpips_distance(gray, y[:, :1], "vgg"),
                       independent_lpips(features, lpips, gray.expand(-1, 3, -1, -1), y[:, :1].expand(-1, 3, -1, -1)),
                       rtol=1e-4)


def serve(files):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            if name not in files:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[name])))
            self.end_headers()
            self.wfile.write(files[name])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_only_fetches_lpips_weights_with_their_hash(tmp_path, lpips_over_standin_torchvision, capsys,
                                                             monkeypatch, caplog):
    data = b"backbone weights"
    name = f"vgg16-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    server = serve({name: data, "vgg16-00000000.pth": data})
    try:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        monkeypatch.setattr(utils, "LPIPS_WEIGHTS_URL", f"http://127.0.0.1:{server.server_address[1]}/")
        monkeypatch.setattr(utils, "LPIPS_BACKBONES", {"vgg": name, "alex": "alexnet-owt-7be5be79.pth"})
        assert "backbone weights" in utils.lpips_unavailable("vgg")
        r = cli(["--download_only", "--model_id", "analytic"], capsys, monkeypatch, caplog)
        assert r.returncode == 0 and "LPIPS (vgg) backbone weights in" in r.stdout
        assert open(utils.lpips_weights_path("vgg"), "rb").read() == data
        assert utils.lpips_unavailable("vgg") is None
        monkeypatch.setattr(utils, "LPIPS_BACKBONES", {"vgg": "vgg16-00000000.pth", "alex": ""})   # wrong hash
        r = cli(["--download_only", "--model_id", "analytic"], capsys, monkeypatch, caplog)
        assert r.returncode == 0 and "could not be fetched" in r.stderr
        assert not os.path.exists(utils.lpips_weights_path("vgg"))
    finally:
        server.shutdown()


def test_run_without_lpips_says_so_and_writes_no_value(tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "lpips", None)       # import lpips -> ImportError, as without the package
    r = cli(["--model_id", "analytic", "--img_size", "32", "--num_inference_steps", "3", "--kernel_size", "7",
             "--grid_size", "4", "--n_eigen_psfs", "4", "--save_dir", str(tmp_path)], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / run_dirs(tmp_path)[0] / "metrics.json").read_text())
    assert "does not import" in m["lpips_note"]
    assert not [k for k in m if k.startswith("lpips_") and k != "lpips_note"]


def test_run_with_lpips_records_it_for_restored_blurred_and_baselines(tmp_path, lpips_over_standin_torchvision,
                                                                      capsys, monkeypatch, caplog):
    monkeypatch.setattr(utils, "lpips_unavailable", lambda net: None)   # the stand-in backbone needs no file
    r = cli(["--model_id", "analytic", "--img_size", "32", "--num_inference_steps", "3", "--kernel_size", "7",
             "--grid_size", "4", "--n_eigen_psfs", "4", "--save_dir", str(tmp_path)], capsys, monkeypatch, caplog)
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / run_dirs(tmp_path)[0]
    m = json.loads((run / "metrics.json").read_text())
    assert {"lpips_blurred", "lpips_restored", "lpips_richardson_lucy", "lpips_tikhonov"} <= set(m)
    assert "vgg" in m["lpips_definition"] and "lpips_note" not in m
    clean, restored = (torch.from_numpy(np.load(run / f)).permute(2, 0, 1)[None] for f in ("clean.npy", "restored.npy"))
    assert np.isclose(m["lpips_restored"], utils.lpips_distance(clean, restored, "vgg")[0], rtol=1e-5)
